"""ΔConvBlock: the convolutional replacement for one self-attention layer.

Channel-last throughout ([B, H, W, C], video [B, T, H, W, C]), parameter names matching the official ConvFusion
checkpoints, so an official block state dict loads with no renaming:

    conv_up                      Linear(C, C_i)            C_i = C // 2
    conv_time                    (video blocks) depthwise over time on conv_up's output, weight [k_t, C_i], no
                                 bias, added to it (u + conv_time(u)) and zero-initialised: a fresh or zero one
                                 leaves every frame's u as the image block's
    gates.{i}.conv_spatial       depthwise k×k, weight [k, k, C_i] (+ optional bias [C_i]); per frame on video
    conv_out                     Linear(n · C_i // 2, C)
    conv_pool                    Linear(C, C)              applied to the mean of the block input over the
                                                           image (video: the whole clip, T·H·W)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .quoting import quoted

GATES = ("scaled", "sigmoid")
# Largest kernel size accepted: the fused kernels are compiled per k and tested up to this (official files use ≤ 13).
MAX_KERNEL_SIZE = 17


@dataclass(frozen=True)
class BlockConfig:
    """Everything needed to build one ΔConvBlock; stored per block in our weight files."""

    dim: int
    kernel_size: int
    scales: tuple[float, ...] = (1.0, 0.5)
    gate: str = "scaled"  # "scaled": a·b·√(C_i/2) (released SD/SDXL weights); "sigmoid": a·σ(b) (PixArt)
    dw_bias: bool = False  # depthwise bias, present in checkpoints of the initial official code
    time_kernel: int = 0  # taps of conv_time, the depthwise convolution over time of video blocks; 0: none

    student: ClassVar[str] = "deltaconv"  # not stored: entries without a student type are ΔConv (students.py)
    schedule: ClassVar[None] = None  # the same block at every step
    OPTIONAL: ClassVar[dict] = {"time_kernel": 0}  # stored only when set: image entries stay as old readers know

    def __post_init__(self):
        # Types first: configs also come from weight-file metadata, where 320.0 or "7" must not get through.
        for name in ("dim", "kernel_size", "time_kernel"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {quoted(getattr(self, name))}")
        if not isinstance(self.dw_bias, bool):
            raise ValueError(f"dw_bias must be true or false, got {quoted(self.dw_bias)}")
        if not isinstance(self.scales, (tuple, list)) or any(
                isinstance(s, bool) or not isinstance(s, (int, float)) for s in self.scales):
            raise ValueError(f"scales must be a list of numbers, got {quoted(self.scales)}")
        if self.dim < 4 or self.dim % 4:
            raise ValueError(f"ΔConvBlock needs a channel count divisible by 4, got {quoted(self.dim)}")
        if not 1 <= self.kernel_size <= MAX_KERNEL_SIZE or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number from 1 to {MAX_KERNEL_SIZE}, got "
                             f"{quoted(self.kernel_size)}")
        if self.time_kernel and (not 1 <= self.time_kernel <= MAX_KERNEL_SIZE or self.time_kernel % 2 == 0):
            raise ValueError(f"time_kernel must be 0 (no convolution over time) or an odd number from 1 to "
                             f"{MAX_KERNEL_SIZE}, got {quoted(self.time_kernel)}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {quoted(self.gate)}")
        if not self.scales or self.scales[0] != 1.0 or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must start with 1.0 and lie in (0, 1], got {quoted(self.scales)}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @property
    def inner_dim(self) -> int:
        return self.dim // 2

    def to_dict(self) -> dict:
        d = {**asdict(self), "scales": list(self.scales)}
        return {k: v for k, v in d.items() if k not in self.OPTIONAL or v != self.OPTIONAL[k]}

    @classmethod
    def from_dict(cls, d: dict) -> BlockConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:  # named here, cut: as a keyword argument it would be quoted whole
            raise ValueError(f"unknown block setting(s) {quoted(unknown)}")
        return cls(**{**d, "scales": tuple(d.get("scales", (1.0, 0.5)))})


class DepthwiseConv(nn.Module):
    """Depthwise k×k convolution whose weight is stored channel-last as [k, k, C] (the official layout)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size, kernel_size, channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self):
        # kaiming_uniform_ on the [k, k, C] tensor, as the official code does (fan_in = k·C).
        nn.init.kaiming_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def cast_weight_bias(self, x: torch.Tensor):
        """Weights on x's device and dtype; ComfyUI's layer overrides this to honour its casting/offloading."""
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return self.weight.to(device=x.device, dtype=x.dtype), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] view of a channel-last tensor; returns the same layout."""
        weight, bias = self.cast_weight_bias(x)
        weight = weight.permute(2, 0, 1).unsqueeze(1)  # [C, 1, k, k]
        return F.conv2d(x, weight, bias, padding=self.kernel_size // 2, groups=x.shape[1])


class Linear(nn.Linear):
    """nn.Linear that also hands out its weights in x's dtype, for the fused output projection."""

    def cast_weight_bias(self, x: torch.Tensor):
        return self.weight.to(device=x.device, dtype=x.dtype), self.bias.to(device=x.device, dtype=x.dtype)


class TimeDepthwiseConv(nn.Module):
    """Depthwise convolution over time only (k×1×1), weight stored channel-last as [k, C]: video students."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size, channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None

    cast_weight_bias = DepthwiseConv.cast_weight_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T, H, W] view of a channel-last tensor; returns the same layout."""
        weight, bias = self.cast_weight_bias(x)
        weight = weight.t()[:, None, :, None, None]  # [C, 1, k, 1, 1]
        return F.conv3d(x, weight, bias, padding=(self.kernel_size // 2, 0, 0), groups=x.shape[1])


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a weight (as Wan's q/k norms), casting like the other layers."""

    def __init__(self, channels: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.bias = None  # for ComfyUI's weight casting, which casts a bias too

    def cast_weight_bias(self, x: torch.Tensor):
        return self.weight.to(device=x.device, dtype=x.dtype), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, _ = self.cast_weight_bias(x)
        return F.rms_norm(x, weight.shape, weight, self.eps)


# Layer factories; ComfyUI's node layer swaps in its casting/offloading-aware subclasses.
TORCH_OPS = SimpleNamespace(Linear=Linear, DepthwiseConv=DepthwiseConv, TimeDepthwiseConv=TimeDepthwiseConv,
                            RMSNorm=RMSNorm)


def pooled_size(size, scale: float) -> tuple[int, int]:
    """Grid of a pyramid scale: int() as the official code does; at least 1 so a 1-pixel-wide grid still pools."""
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


class PyramidGate(nn.Module):
    """One pyramid scale: [pool] → depthwise conv → gate → [bilinear back to H×W]."""

    def __init__(self, channels: int, kernel_size: int, scale: float, gate: str, bias: bool, ops, **factory):
        super().__init__()
        self.scale_factor = scale
        self.gate = gate
        self.conv_spatial = ops.DepthwiseConv(channels, kernel_size, bias=bias, **factory)
        # The released SD/SDXL weights were trained with a·b·√(C_i/2) (code), not the paper's a·b/√C'.
        self.gate_constant = math.sqrt(channels / 2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: [B, C_i, H, W] channel-last view; returns [B, C_i/2, H, W] in the same layout."""
        size = u.shape[-2:]
        if self.scale_factor != 1.0:
            u = F.adaptive_avg_pool2d(u, pooled_size(size, self.scale_factor))
        v = self.conv_spatial(u)
        a, b = v.chunk(2, dim=1)
        y = a * b * self.gate_constant if self.gate == "scaled" else a * torch.sigmoid(b)
        if self.scale_factor != 1.0:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class DeltaConvBlock(nn.Module):
    """Pyramid depthwise convolutions with a gate plus a global pooling branch, [B, H, W, C] → [B, H, W, C];
    on video [B, T, H, W, C], the same per frame after conv_time mixes conv_up's output over time, pooled over the
    whole clip.

    A student (students.Student): its class attributes and static methods are what weight files, patching and
    the reports need to know about it."""

    kind = "deltaconv"  # its type name in weight files
    label = "ΔConv block"
    tensor_group = "conv1"  # `<site>.conv1.<param>` in weight files
    param_pattern = r"(?:conv_up|conv_time|conv_out|conv_pool|gates\.\d+\.conv_spatial)\.(?:weight|bias)"
    config_type = BlockConfig
    grid_dims = (2, 3)  # images and video (a block without conv_time runs a video frame by frame, pooled per clip)

    def __init__(self, config: BlockConfig, ops=TORCH_OPS, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        c, ci = config.dim, config.inner_dim
        self.conv_up = ops.Linear(c, ci, **factory)
        self.conv_time = ops.TimeDepthwiseConv(ci, config.time_kernel, **factory) if config.time_kernel else None
        self.gates = nn.ModuleList(
            PyramidGate(ci, config.kernel_size, s, config.gate, config.dw_bias, ops, **factory) for s in config.scales
        )
        self.conv_out = ops.Linear(len(config.scales) * (ci // 2), c, **factory)
        self.conv_pool = ops.Linear(c, c, **factory)

    def reset_parameters(self):
        """Fresh initialisation (explicit, because ComfyUI's layer classes skip their own)."""
        for linear in (self.conv_up, self.conv_out, self.conv_pool):
            nn.Linear.reset_parameters(linear)
        for gate in self.gates:
            gate.conv_spatial.reset_parameters()
        if self.conv_time is not None:
            nn.init.zeros_(self.conv_time.weight)  # the image block at first; the residual still passes gradient
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C], or a video [B, T, H, W, C]; a video block takes an image as one frame."""
        if x.dim() == 5 or self.conv_time is not None:
            return self._forward_video(x if x.dim() == 5 else x.unsqueeze(1)).view(x.shape)
        u = self.conv_up(x)  # [B, H, W, C_i]
        pooled = self.conv_pool(x.mean(dim=(1, 2)))  # uses the block input, not conv_up's output
        # Fused Triton kernels (CUDA; off with DELTACONV_TRITON=0), except under torch.compile: dynamo cannot trace
        # their launcher and fallback logic, and inductor generates its own kernels from the torch path below.
        if not torch.compiler.is_compiling() and kernels.use_triton(u):
            out = self._forward_kernels(u, pooled)
            if out is not None:
                return out
        return self._project(u, pooled)

    def _forward_video(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, W, C]. The frames go through the torch path as a batch of images: the fused kernels are
        2-D and are tested on images only."""
        b, t, h, w, _ = x.shape
        u = self.conv_up(x)  # [B, T, H, W, C_i]
        if self.conv_time is not None:  # added, not replacing u: zero weights leave each frame's u as it was
            u = u + self.conv_time(u.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        # The uniform part of video attention is the mean over every frame it attends to: the whole clip.
        pooled = self.conv_pool(x.mean(dim=(1, 2, 3)))
        return self._project(u.reshape(b * t, h, w, -1), pooled.repeat_interleave(t, dim=0))

    def _project(self, u: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The rest of the block in torch: u [N, H, W, C_i] (conv_up's output), pooled [N, C] (conv_pool's) →
        [N, H, W, C]."""
        b, h, w, _ = u.shape
        c = pooled.shape[1]
        # conv_out(concat(branches)) + conv_pool(mean x) computed as one per-image bias plus a sum of per-branch
        # projections: no concatenated tensor and no extra pass to add the pooled branch. Weights in u's dtype
        # (x's, or the autocast dtype), so that the in-place baddbmm_ below sees one dtype under autocast too.
        weight, bias = self.conv_out.cast_weight_bias(u)
        u = u.permute(0, 3, 1, 2)  # [B, C_i, H, W] view, channel-last in memory
        z = (pooled + bias).unsqueeze(1)  # [B, 1, C], broadcast over the pixels by the first baddbmm
        width = weight.shape[1] // len(self.gates)
        for i, gate in enumerate(self.gates):
            y = gate(u).permute(0, 2, 3, 1).reshape(b, h * w, width)  # a view: the gate output is channel-last
            w_i = weight[:, i * width:(i + 1) * width].t().expand(b, width, c)
            z = torch.baddbmm(z, y, w_i) if i == 0 else z.baddbmm_(y, w_i)
        return z.view(b, h, w, c)

    def _forward_kernels(self, u: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor | None:
        """The rest of the block in Triton (pooled scales stay low-res until the fused projection upsamples
        them), weights in u's dtype as in the torch path; None when the kernels cannot take it."""
        weight, bias = self.conv_out.cast_weight_bias(u)
        gates = [(*g.conv_spatial.cast_weight_bias(u),
                  None if g.scale_factor == 1.0 else pooled_size(u.shape[1:3], g.scale_factor)) for g in self.gates]
        return kernels.delta_conv_or_none(u, gates, self.config.gate, self.gates[0].gate_constant, weight, pooled,
                                          bias)

    @classmethod
    def initial(cls, site, teacher: nn.Module, model_sites, kernel_size: int | tuple[int, int] | None = None,
                schedule=None):
        """Student protocol: a fresh block for `site` (kernel: `kernel_size`, a video block's as (spatial, time);
        else the site's official default and the family's taps over time; the family's gate), randomly
        initialised from torch's generator, which the caller seeds (conv_time zero). Needs no teacher."""
        kernel, time_kernel = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, None)
        if time_kernel is not None and not model_sites.adapter.time_kernel:
            raise ValueError(f"kernel_preset gives block {site.name} a kernel over time ({time_kernel}), but "
                             f"{model_sites.adapter.label} makes images: give one kernel size per block")
        config = BlockConfig(site.channels, kernel or site.kernel_size, gate=model_sites.default_gate,
                             time_kernel=time_kernel or model_sites.adapter.time_kernel)
        return cls(config).reset_parameters()

    def run(self, tokens: torch.Tensor, grid: tuple[int, ...], setting=None) -> torch.Tensor:
        """Student protocol: tokens [B, N, C] on an (h, w) or (t, h, w) grid; ΔConv has no per-step setting."""
        b, n, c = tokens.shape
        return self(tokens.reshape(b, *grid, c)).reshape(b, n, c)

    @staticmethod
    def expected_shapes(config: BlockConfig) -> dict[str, tuple[int, ...]]:
        c, ci, k = config.dim, config.inner_dim, config.kernel_size
        shapes = {"conv_up.weight": (ci, c), "conv_up.bias": (ci,),
                  "conv_out.weight": (c, len(config.scales) * (ci // 2)), "conv_out.bias": (c,),
                  "conv_pool.weight": (c, c), "conv_pool.bias": (c,)}
        if config.time_kernel:
            shapes["conv_time.weight"] = (config.time_kernel, ci)
        for i in range(len(config.scales)):
            shapes[f"gates.{i}.conv_spatial.weight"] = (k, k, ci)
            if config.dw_bias:
                shapes[f"gates.{i}.conv_spatial.bias"] = (ci,)
        return shapes

    @staticmethod
    def macs(config: BlockConfig, grid: tuple[int, ...], setting=None) -> int:
        """Per token C·C/2 (conv_up) + k_t·C/2 (conv_time) + (n·C/4)·C (conv_out), × N tokens (video: all
        frames'); + k²·C/2 per pixel of each scale's pooled grid (per frame; odd sides round down); + C² for the
        pooled branch, once per image or clip."""
        c, k, scales = config.dim, config.kernel_size, config.scales
        *frames, h, w = grid
        per_token = c * c // 2 + config.time_kernel * (c // 2) + len(scales) * (c // 4) * c
        pooled_pixels = math.prod(frames) * sum(math.prod(pooled_size((h, w), s)) for s in scales)
        return int(math.prod(grid) * per_token + pooled_pixels * k * k * (c // 2) + c * c)

    @staticmethod
    def describe(configs: list[BlockConfig]) -> str:
        kernels_used = sorted({cfg.kernel_size for cfg in configs})
        scales = "/".join(str(n) for n in sorted({len(cfg.scales) for cfg in configs}))
        time = sorted({cfg.time_kernel for cfg in configs} - {0})
        over_time = f", {'/'.join(map(str, time))} taps in time" if time else ""
        return f"{len(configs)} ΔConv blocks, kernels {kernels_used}, {scales} scales{over_time}"

    def extra_repr(self) -> str:
        c = self.config
        over_time = f", time_kernel={c.time_kernel}" if c.time_kernel else ""
        return f"dim={c.dim}, kernel_size={c.kernel_size}, scales={c.scales}, gate={c.gate}{over_time}"

