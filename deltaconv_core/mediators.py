"""MediatorAttention: the second student for one self-attention site (Attention Mediators, Pu et al., ECCV 2024).

Global attention routed through a few mediator tokens, linear in the number of pixels:

    T   = avgpool(Q) to a (p_h, p_w) grid          mediators are pooled queries, n = p_h·p_w
    V_m = softmax(T Kᵀ/√d) V                       mediators gather from all tokens
    out = proj(softmax(Q Tᵀ/√d) V_m + DWC(V))      every token reads the mediators; DWC adds locality

Channel-last like ΔConvBlock ([B, H, W, C] in and out), so a site wrapper hands it the same grid. Parameters:

    qkv    Linear(C, 3C)    q|k|v, the teacher's projections (SD: to_q/to_k/to_v with zero bias; PixArt: qkv)
    proj   Linear(C, C)     the teacher's output projection (SD: to_out.0; PixArt: proj)
    dwc    depthwise 3×3 on V, weight [3, 3, C] + bias [C], zero-initialised so training starts from the
           teacher's projections around a pure mediator attention

No position biases. The official ones are tensors sized to one latent grid (and one count), so any other
resolution crashes, and interpolating them per call ties quality to the training resolution while users sample
at many aspect buckets. SD's attn1 has no positional bias either (position enters through the convolutions);
here the DWC carries locality. So one set of weights serves every grid and every count.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .block import TORCH_OPS
from .mediator_schedule import MediatorSchedule
from .quoting import quoted

DEFAULT_SCHEDULE = MediatorSchedule.parse("0.0:4,0.5:16,0.8:64")  # few mediators at high noise, more later
DWC_KERNEL = 3


@functools.lru_cache(maxsize=4096)
def mediator_grid(n: int, h: int, w: int) -> tuple[int, int]:
    """(p_h, p_w) mediator grid for about n mediators on an h×w token grid.

    Never more cells than n or than the tokens (p_h ≤ h, p_w ≤ w). For each row count the most columns the budget
    allows; among those, the grid minimising 2·|ln(n/cells)| + |ln(cell aspect)|, the cell aspect being
    (h/p_h)/(w/p_w): close to n cells, cells close to square in token units (so 1216×832 latents get 9×7 for n=64).
    """
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"mediator_grid needs n, h, w ≥ 1, got n={n}, h={h}, w={w}")
    n = min(n, h * w)
    best = None
    for ph in range(1, min(h, n) + 1):
        pw = min(w, n // ph)
        cost = 2 * math.log(n / (ph * pw)) + abs(math.log((h / ph) / (w / pw)))
        key = (round(cost, 9), -ph * pw, ph)  # rounding: mirror-image grids tie exactly
        if best is None or key < best[0]:
            best = (key, (ph, pw))
    return best[1]


def mediator_macs(hw: tuple[int, int], dim: int, mediators: int) -> int:
    """Multiply-accumulates of one site: 4NC² (qkv + proj) + 4nNC (two attentions) + 9NC (3×3 DWC),
    with n the count actually used on this grid (the pooled grid's cells)."""
    ph, pw = mediator_grid(mediators, *hw)
    tokens = hw[0] * hw[1]
    return 4 * tokens * dim * dim + 4 * ph * pw * tokens * dim + DWC_KERNEL ** 2 * tokens * dim


@dataclass(frozen=True)
class MediatorConfig:
    """Everything needed to build one MediatorAttention; stored per site in our weight files."""

    dim: int
    heads: int
    schedule: MediatorSchedule = DEFAULT_SCHEDULE

    student = "mediators"  # the student type our weight files record (a class attribute, not a field)

    def __post_init__(self):
        for name in ("dim", "heads"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"mediator attention: {name} must be an integer, got "
                                 f"{quoted(getattr(self, name))}")
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"mediator attention needs a channel count divisible by the heads, got "
                             f"dim={quoted(self.dim)}, heads={quoted(self.heads)}")
        if isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", MediatorSchedule.parse(self.schedule))
        elif not isinstance(self.schedule, MediatorSchedule):
            raise ValueError(f"schedule must be a MediatorSchedule or its text form, got {quoted(self.schedule)}")

    def to_dict(self) -> dict:
        return {"student": self.student, "dim": self.dim, "heads": self.heads, "schedule": self.schedule.format()}

    @classmethod
    def from_dict(cls, d: dict) -> MediatorConfig:
        fields = {k: v for k, v in d.items() if k != "student"}
        missing, extra = {"dim", "heads", "schedule"} - set(fields), set(fields) - {"dim", "heads", "schedule"}
        if missing or extra:
            raise ValueError(f"mediator config needs exactly dim, heads and schedule; missing "
                             f"{quoted(sorted(missing))}, unexpected {quoted(sorted(extra))}")
        return cls(**fields)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA, in fp32 for fp16 inputs. Logits are as large as in full attention and overflow fp16 past 65504 when
    materialised in it, which SDPA's math fallback does on older torch, or on newer torch once anything enables
    fp16 reductions (torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp); the fused kernels accumulate in fp32,
    but which kernel runs is not ours to choose. bf16 has fp32's range and stays. Both attentions are small (N×n),
    so the upcast costs little; autocast is off inside so it cannot cast the inputs back to fp16."""
    if q.dtype != torch.float16:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


def teacher_projections(teacher: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """(qkv/proj tensors under the student's names, head count) of a teacher self-attention module:
    SD/SDXL `attn1` (to_q, to_k, to_v without bias, to_out.0) or PixArt's attention (fused qkv, proj)."""
    if all(hasattr(teacher, n) for n in ("to_q", "to_k", "to_v", "to_out")):
        linears, out, heads = (teacher.to_q, teacher.to_k, teacher.to_v), teacher.to_out[0], teacher.heads
    elif hasattr(teacher, "qkv") and hasattr(teacher, "proj"):
        for norm in ("q_norm", "k_norm"):  # a q/k LayerNorm would be a different attention; none in PixArt-α/Σ
            if not isinstance(getattr(teacher, norm, nn.Identity()), nn.Identity):
                raise ValueError(f"teacher attention has a {norm}; mediator attention has no q/k normalisation")
        linears, out, heads = (teacher.qkv,), teacher.proj, teacher.num_heads
    else:
        raise ValueError(f"{type(teacher).__name__} is neither an SD attn1 (to_q/to_k/to_v/to_out) nor a PixArt "
                         "attention (qkv/proj)")
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                      for lin in linears])
    dim = out.out_features
    if weight.shape != (3 * dim, dim) or out.weight.shape != (dim, dim):
        raise ValueError(f"teacher projections {list(weight.shape)} → {list(out.weight.shape)}: mediator attention "
                         f"needs q/k/v and output widths equal to the channel count {dim}")
    proj_bias = out.bias.detach() if out.bias is not None else weight.new_zeros(dim)
    return {"qkv.weight": weight, "qkv.bias": bias, "proj.weight": out.weight.detach(), "proj.bias": proj_bias}, heads


class MediatorAttention(nn.Module):
    """Self-attention through pooled-query mediators, [B, H, W, C] → [B, H, W, C]; forward(x, mediators=n)."""

    def __init__(self, config: MediatorConfig, ops=TORCH_OPS, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.qkv = ops.Linear(config.dim, 3 * config.dim, **factory)
        self.proj = ops.Linear(config.dim, config.dim, **factory)
        self.dwc = ops.DepthwiseConv(config.dim, DWC_KERNEL, bias=True, **factory)

    def reset_parameters(self):
        """Fresh initialisation without a teacher (explicit, because ComfyUI's layer classes skip their own)."""
        nn.Linear.reset_parameters(self.qkv)
        nn.Linear.reset_parameters(self.proj)
        nn.init.zeros_(self.dwc.weight)
        nn.init.zeros_(self.dwc.bias)
        return self

    @classmethod
    def from_teacher(cls, teacher: nn.Module, schedule: MediatorSchedule = DEFAULT_SCHEDULE, ops=TORCH_OPS,
                     device=None, dtype=None) -> MediatorAttention:
        """A student initialised from a teacher attention module: its own trainable copies of the teacher's
        projections (the teacher stays untouched), a zero DWC."""
        state, heads = teacher_projections(teacher)
        student = cls(MediatorConfig(state["proj.weight"].shape[0], heads, schedule), ops, device, dtype)
        state["dwc.weight"] = torch.zeros(student.dwc.weight.shape)
        state["dwc.bias"] = torch.zeros(student.dwc.bias.shape)
        student.load_state_dict(state, strict=True)  # copies, cast to the student's device and dtype
        return student

    def forward(self, x: torch.Tensor, mediators: int) -> torch.Tensor:
        b, h, w, c = x.shape
        heads = self.config.heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, H, W, C] each
        grid = mediator_grid(mediators, h, w)
        t = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)  # [B, n, C]

        def split_heads(z):  # [B, ..., C] → [B, heads, tokens, d]
            return z.reshape(b, -1, heads, c // heads).transpose(1, 2)

        q, k, t, v_heads = map(split_heads, (q, k, t, v))
        v_mediated = attend(t, k, v_heads)  # [B, heads, n, d]
        out = attend(q, t, v_mediated).transpose(1, 2).reshape(b, h, w, c)
        out = out + self.dwc(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # on the true H×W grid
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.config.dim}, heads={self.config.heads}, schedule={self.config.schedule.format()!r}"
