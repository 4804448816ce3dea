"""MediatorAttention: the second student for one self-attention site (Attention Mediators, Pu et al., ECCV 2024).

Global attention routed through a few mediator tokens, linear in the number of pixels:

    T   = avgpool(Q) to a (p_h, p_w) grid          mediators are pooled queries, n = p_h·p_w
    V_m = softmax(T Kᵀ/√d) V                       mediators gather from all tokens
    out = proj(softmax(Q Tᵀ/√d) V_m + DWC(V))      every token reads the mediators; DWC adds locality

Channel-last like ΔConvBlock ([B, H, W, C] in and out), so a site wrapper hands it the same grid; video models
hand it [B, T, H, W, C] (latent frames × h × w). Parameters:

    qkv    Linear(C, 3C)    q|k|v, the teacher's projections (SD: to_q/to_k/to_v with zero bias; PixArt: qkv;
                            Wan: q/k/v)
    proj   Linear(C, C)     the teacher's output projection (SD: to_out.0; PixArt: proj; Wan: o)
    dwc    depthwise 3×3 on V, weight [3, 3, C] + bias [C], zero-initialised so training starts from the
           teacher's projections around a pure mediator attention; on video, per frame
    norm_q, norm_k          (teachers with them: Wan) the RMSNorms over the whole q and k, weight [C] each;
                            config.qk_norm_eps is their eps
    dwc_time                (video) depthwise over time on V, weight [3, C] + bias [C], zero-initialised; added to
                            dwc, not composed with it: two zero-initialised convolutions in a row get no gradient.
                            Per frame + over time instead of 3×3×3: 12 taps, not 27, and latent frames (4 video
                            frames each) are less alike than neighbouring pixels, so time gets its own kernel

No position biases. The official ones are tensors sized to one latent grid (and one count), so any other
resolution crashes, and interpolating them per call ties quality to the training resolution while users sample
at many aspect buckets. SD's attn1 has no positional bias either (position enters through the convolutions);
here the DWC carries locality. So one set of weights serves every grid and every count. For the same reason no
RoPE on video: Wan's 3-D RoPE rotates q and k per position, and a mediator, the mean of a cell's queries, has no
position (the rotated queries would partly cancel in the mean); its q·k logits are the teacher's at zero offset.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .block import TORCH_OPS
from .families import teacher_projections
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


@functools.lru_cache(maxsize=4096)
def mediator_grid_3d(n: int, t: int, h: int, w: int) -> tuple[int, int, int]:
    """(p_t, p_h, p_w) mediator grid for about n mediators on a t×h×w token grid (t latent frames).

    One frame is an image: mediator_grid's choice. Otherwise the same rule with time counted in latent frames like
    rows and columns: never more cells than n or than the tokens along any axis; for each (p_t, p_h) the most p_w
    the budget allows; among those, the grid minimising 2·|ln(n/cells)| + (largest − smallest ln of the cell's
    sides): close to n cells, cells close to cubic in token units (the 2-D rule's cell aspect, over three sides).
    """
    if n < 1 or t < 1 or h < 1 or w < 1:
        raise ValueError(f"mediator_grid_3d needs n, t, h, w ≥ 1, got n={n}, t={t}, h={h}, w={w}")
    if t == 1:
        return (1, *mediator_grid(n, h, w))
    n = min(n, t * h * w)
    best = None
    for pt in range(1, min(t, n) + 1):
        for ph in range(1, min(h, n // pt) + 1):
            pw = min(w, n // (pt * ph))
            sides = (math.log(t / pt), math.log(h / ph), math.log(w / pw))
            cost = 2 * math.log(n / (pt * ph * pw)) + max(sides) - min(sides)
            key = (round(cost, 9), -pt * ph * pw, pt, ph)
            if best is None or key < best[0]:
                best = (key, (pt, ph, pw))
    return best[1]


def pooled_grid(n: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The mediator grid for n mediators on an (h, w) or (t, h, w) token grid."""
    return mediator_grid(n, *grid) if len(grid) == 2 else mediator_grid_3d(n, *grid)


def mediator_macs(grid: tuple[int, ...], dim: int, mediators: int, time_kernel: int = 0) -> int:
    """Multiply-accumulates of one site: 4NC² (qkv + proj) + 4nNC (two attentions) + 9NC (3×3 DWC), + kNC for a
    video DWC over time with k taps, with n the count actually used on this grid (the pooled grid's cells)."""
    cells, tokens = math.prod(pooled_grid(mediators, grid)), math.prod(grid)
    return 4 * tokens * dim * dim + 4 * cells * tokens * dim + (DWC_KERNEL ** 2 + time_kernel) * tokens * dim


@dataclass(frozen=True)
class MediatorConfig:
    """Everything needed to build one MediatorAttention; stored per site in our weight files."""

    dim: int
    heads: int
    schedule: MediatorSchedule = DEFAULT_SCHEDULE
    qk_norm_eps: float | None = None  # the eps of q/k RMSNorms copied from the teacher (Wan); None: none
    time_kernel: int = 0  # taps of the DWC over time (video: DWC_KERNEL); 0: image students

    student: ClassVar[str] = "mediators"  # the student type our weight files record (not a field)
    OPTIONAL: ClassVar[dict] = {"qk_norm_eps": None, "time_kernel": 0}  # stored only when set: old readers

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
        eps = self.qk_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ValueError(f"qk_norm_eps must be a small positive number or null, got {quoted(eps)}")
        if type(self.time_kernel) is not int or self.time_kernel not in (0, DWC_KERNEL):
            raise ValueError(f"time_kernel must be 0 or {DWC_KERNEL}, got {quoted(self.time_kernel)}")

    def to_dict(self) -> dict:
        extra = {k: getattr(self, k) for k, default in self.OPTIONAL.items() if getattr(self, k) != default}
        return {"student": self.student, "dim": self.dim, "heads": self.heads, "schedule": self.schedule.format(),
                **extra}

    @classmethod
    def from_dict(cls, d: dict) -> MediatorConfig:
        fields = {k: v for k, v in d.items() if k != "student"}
        needed = {"dim", "heads", "schedule"}
        missing, extra = needed - set(fields), set(fields) - needed - set(cls.OPTIONAL)
        if missing or extra:
            raise ValueError(f"mediator config needs exactly dim, heads and schedule (optionally "
                             f"{', '.join(cls.OPTIONAL)}); missing {quoted(sorted(missing))}, unexpected "
                             f"{quoted(sorted(extra))}")
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


def teacher_state(teacher: nn.Module, family: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], int, float | None]:
    """(qkv/proj tensors, and q/k RMSNorm weights if it has them, under the student's names; head count; the
    norms' eps) of a teacher self-attention module, whose projections its family's adapter finds
    (families.teacher_projections; q/k/v without bias get zero bias)."""
    linears, out, heads, norms = teacher_projections(teacher, family)
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                      for lin in linears])
    dim = out.out_features
    if weight.shape != (3 * dim, dim) or out.weight.shape != (dim, dim):
        raise ValueError(f"teacher projections {list(weight.shape)} → {list(out.weight.shape)}: mediator attention "
                         f"needs q/k/v and output widths equal to the channel count {dim}")
    proj_bias = out.bias.detach() if out.bias is not None else weight.new_zeros(dim)
    state = {"qkv.weight": weight, "qkv.bias": bias, "proj.weight": out.weight.detach(), "proj.bias": proj_bias}
    if norms is None:
        return state, heads, None
    state.update({f"{name}.weight": norm.weight.detach() for name, norm in zip(("norm_q", "norm_k"), norms)})
    return state, heads, float(norms[0].eps)


class MediatorAttention(nn.Module):
    """Self-attention through pooled-query mediators, [B, H, W, C] → [B, H, W, C]; forward(x, mediators=n).

    A student (students.Student) whose per-step setting is the mediator count its schedule gives."""

    kind = "mediators"  # its type name in weight files
    label = "mediator attention"
    tensor_group = "mediators"  # `<site>.mediators.<param>` in weight files
    param_pattern = r"(?:qkv|proj|dwc|dwc_time|norm_q|norm_k)\.(?:weight|bias)"
    config_type = MediatorConfig
    grid_dims = (2, 3)  # images and video

    def __init__(self, config: MediatorConfig, ops=TORCH_OPS, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.qkv = ops.Linear(config.dim, 3 * config.dim, **factory)
        self.proj = ops.Linear(config.dim, config.dim, **factory)
        self.dwc = ops.DepthwiseConv(config.dim, DWC_KERNEL, bias=True, **factory)
        self.dwc_time = ops.TimeDepthwiseConv(config.dim, config.time_kernel, bias=True, **factory) \
            if config.time_kernel else None
        norms = [ops.RMSNorm(config.dim, config.qk_norm_eps, **factory) for _ in range(2)] \
            if config.qk_norm_eps is not None else (None, None)
        self.norm_q, self.norm_k = norms

    def reset_parameters(self):
        """Fresh initialisation without a teacher (explicit, because ComfyUI's layer classes skip their own)."""
        nn.Linear.reset_parameters(self.qkv)
        nn.Linear.reset_parameters(self.proj)
        for dwc in filter(None, (self.dwc, self.dwc_time)):
            nn.init.zeros_(dwc.weight)
            nn.init.zeros_(dwc.bias)
        for norm in filter(None, (self.norm_q, self.norm_k)):
            nn.init.ones_(norm.weight)
        return self

    @classmethod
    def from_teacher(cls, teacher: nn.Module, schedule: MediatorSchedule = DEFAULT_SCHEDULE, ops=TORCH_OPS,
                     device=None, dtype=None, family: str | None = None, video: bool = False) -> MediatorAttention:
        """A student initialised from a teacher attention module of `family` (None: whichever family's it is):
        its own trainable copies of the teacher's projections and q/k norms (the teacher stays untouched), zero
        DWCs (`video`: per frame and over time)."""
        state, heads, eps = teacher_state(teacher, family)
        config = MediatorConfig(state["proj.weight"].shape[0], heads, schedule, eps, DWC_KERNEL if video else 0)
        student = cls(config, ops, device, dtype)
        for dwc in ("dwc", "dwc_time") if video else ("dwc",):
            state[f"{dwc}.weight"] = torch.zeros(getattr(student, dwc).weight.shape)
            state[f"{dwc}.bias"] = torch.zeros(getattr(student, dwc).bias.shape)
        student.load_state_dict(state, strict=True)  # copies, cast to the student's device and dtype
        return student

    def forward(self, x: torch.Tensor, mediators: int) -> torch.Tensor:
        """x: [B, H, W, C], or [B, T, H, W, C] on video (mediators pooled in 3-D, mediator_grid_3d)."""
        b, *grid, c = x.shape
        heads = self.config.heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, *grid, C] each
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
        t = pool(q.movedim(-1, 1), pooled_grid(mediators, tuple(grid))).flatten(2).transpose(1, 2)  # [B, n, C]

        def split_heads(z):  # [B, ..., C] → [B, heads, tokens, d]
            return z.reshape(b, -1, heads, c // heads).transpose(1, 2)

        q, k, t, v_heads = map(split_heads, (q, k, t, v))
        v_mediated = attend(t, k, v_heads)  # [B, heads, n, d]
        out = attend(q, t, v_mediated).transpose(1, 2).reshape(b, *grid, c)
        return self.proj(out + self._dwc(v))

    def _dwc(self, v: torch.Tensor) -> torch.Tensor:
        """The DWC on the true grid: 3×3 per image or frame, plus over time on video."""
        if v.dim() == 4:
            return self.dwc(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, f, h, w, c = v.shape
        out = self.dwc(v.reshape(b * f, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(v.shape)
        if self.dwc_time is not None:
            out = out + self.dwc_time(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        return out

    @classmethod
    def initial(cls, site, teacher: nn.Module, model_sites, kernel_size: int | None = None,
                schedule: MediatorSchedule | None = None) -> MediatorAttention:
        """Student protocol: a fresh student for `site`, from the teacher's projections (from_teacher), running
        `schedule` (default DEFAULT_SCHEDULE); its DWC is 3×3 whatever `kernel_size` (video: plus 3 over time)."""
        return cls.from_teacher(teacher, schedule or DEFAULT_SCHEDULE, family=model_sites.family,
                                video=model_sites.adapter.grid_dims == 3)

    def run(self, tokens: torch.Tensor, grid: tuple[int, ...], setting: int) -> torch.Tensor:
        """Student protocol: tokens [B, N, C] on an (h, w) or (t, h, w) grid, with `setting` mediators."""
        b, n, c = tokens.shape
        return self(tokens.reshape(b, *grid, c), setting).reshape(b, n, c)

    @staticmethod
    def expected_shapes(config: MediatorConfig) -> dict[str, tuple[int, ...]]:
        c = config.dim
        shapes = {"qkv.weight": (3 * c, c), "qkv.bias": (3 * c,), "proj.weight": (c, c), "proj.bias": (c,),
                  "dwc.weight": (DWC_KERNEL, DWC_KERNEL, c), "dwc.bias": (c,)}
        if config.time_kernel:
            shapes.update({"dwc_time.weight": (config.time_kernel, c), "dwc_time.bias": (c,)})
        if config.qk_norm_eps is not None:
            shapes.update({"norm_q.weight": (c,), "norm_k.weight": (c,)})
        return shapes

    @staticmethod
    def macs(config: MediatorConfig, grid: tuple[int, ...], setting: int) -> int:
        return mediator_macs(grid, config.dim, setting, config.time_kernel)

    @staticmethod
    def describe(configs: list[MediatorConfig]) -> str:
        schedules = " / ".join(sorted({cfg.schedule.format() for cfg in configs}))
        return f"{len(configs)} mediator-attention sites, schedule {schedules}"

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self.config, k)}" for k, d in MediatorConfig.OPTIONAL.items()
                        if getattr(self.config, k) != d)
        return f"dim={self.config.dim}, heads={self.config.heads}, schedule={self.config.schedule.format()!r}{extra}"
