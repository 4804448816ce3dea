"""Attention-locality statistics (the paper's analysis): how local is a self-attention layer, and which kernel fits.

Input: attention probabilities of some query positions over the tokens of one layer (heads averaged), on an image
grid (h, w) or a video grid (t, h, w). Spatial statistics use Chebyshev distance, so "within d" means inside the
(2d+1)×(2d+1) window a k×k kernel sees; temporal ones the distance in frames, the window a kt-tap conv over time sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASS_TARGET = 0.8  # ERF: the smallest window holding this share of the local attention mass (paper: ASM ≥ 0.8)
KERNEL_FRACTION = 0.6  # the official kernel sizes are ≈ 0.6 × the measured ERF, rounded to odd


@dataclass
class LocalityStats:
    aligned_map: torch.Tensor  # [2H-1, 2W-1] mean attention map re-centred on each query
    mass_within: torch.Tensor  # [max distance + 1]: share of attention within Chebyshev distance d
    uniform_fraction: float  # share of attention spread uniformly over the image (the "global" component)
    erf: int  # effective receptive field of the local component, as an odd window size
    suggested_kernel: int  # odd, ≈ KERNEL_FRACTION × erf

    def mass_in_kernel(self, k: int) -> float:
        return float(self.mass_within[min((k - 1) // 2, len(self.mass_within) - 1)])


def _offsets(query_pos: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Per query and grid axis, the offset of every token from the query along that axis: [Q, N] each."""
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return [a.flatten()[None] - query_pos[:, i:i + 1] for i, a in enumerate(axes)]


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Head-averaged softmax(q·kᵀ/√d) of one image: q [Q, C] (the chosen queries), k [N, C] → [Q, N], fp32."""
    d = q.shape[-1] // heads
    q = q.float().view(-1, heads, d).transpose(0, 1)
    k = k.float().view(-1, heads, d).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1).mean(dim=0)


def nearest_odd(x: float) -> int:
    """The odd kernel size closest to x (at least 1)."""
    return max(1, 2 * round((x - 1) / 2) + 1)


def _split(attn: torch.Tensor, uniform_quantile: float):
    """Rows renormalised (float64), each row's uniform floor (a low quantile: what every token gets at least),
    the uniform share (the floor summed over the tokens) and the local part (above the floor, rows summing to 1)."""
    attn = attn.double()
    attn = attn / attn.sum(dim=1, keepdim=True)
    floor = torch.quantile(attn, uniform_quantile, dim=1, keepdim=True)
    uniform = float((floor * attn.shape[1]).mean().clamp(0, 1))
    local = (attn - floor).clamp(min=0)
    total = local.sum(dim=1, keepdim=True)
    return attn, uniform, None if float(total.max()) <= 1e-12 else local / total.clamp(min=1e-12)


def _profile(attn: torch.Tensor, local: torch.Tensor | None, dist: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The share of attention within distance d (mean over queries, [max d + 1]) and the ERF: the smallest odd
    window holding MASS_TARGET of the local part (the whole extent when there is no local part)."""
    max_d = int(dist.max())
    mass = torch.zeros(attn.shape[0], max_d + 1, dtype=torch.float64).scatter_add_(1, dist, attn)
    if local is None:  # nothing but the uniform part: the whole grid is the receptive field
        return mass.cumsum(dim=1).mean(dim=0), 2 * max_d + 1
    curve = torch.zeros_like(mass).scatter_add_(1, dist, local).cumsum(dim=1).mean(dim=0)
    return mass.cumsum(dim=1).mean(dim=0), 2 * int((curve >= MASS_TARGET - 1e-9).nonzero()[0]) + 1


def _aligned(attn: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The mean attention map re-centred on each query, [2H-1, 2W-1] (tokens at the same (dy, dx) summed)."""
    aligned = torch.zeros(2 * h - 1, 2 * w - 1, dtype=torch.float64)
    aligned.index_put_(((dy + h - 1).flatten(), (dx + w - 1).flatten()), attn.flatten(), accumulate=True)
    return (aligned / attn.shape[0]).float()


def locality_stats(attn: torch.Tensor, query_yx: torch.Tensor, grid: tuple[int, int],
                   uniform_quantile: float = 0.1) -> LocalityStats:
    """attn: [Q, H·W] rows summing to 1; query_yx: [Q, 2] integer positions of the queries on the grid."""
    attn, uniform, local = _split(attn, uniform_quantile)
    dy, dx = _offsets(query_yx.long(), grid)
    mass_within, erf = _profile(attn, local, torch.maximum(dy.abs(), dx.abs()))
    return LocalityStats(_aligned(attn, dy, dx, *grid), mass_within.float(), uniform, erf,
                         nearest_odd(KERNEL_FRACTION * erf))


@dataclass
class VideoLocalityStats:
    """Locality of video attention, in space and in time, read separately: a 3-D ΔConv block is separable (a
    per-frame spatial pyramid after a depthwise conv over time), and so is the positional part of attention under
    an axis-wise 3-D RoPE (its logits are a sum of a temporal and spatial terms)."""
    spatial: LocalityStats  # by spatial distance whatever the frame: the aligned map sums the frames
    time_mass_within: torch.Tensor  # [T]: share of attention within d frames
    time_erf: int  # frames (odd window) holding MASS_TARGET of the local part
    suggested_time_kernel: int  # = time_erf: no pyramid widens the conv over time, so it covers the ERF itself
    box_mass: torch.Tensor  # [T, max spatial d + 1]: share within d_t frames and spatial distance d

    def mass_in_time_kernel(self, kt: int) -> float:
        return float(self.time_mass_within[min((kt - 1) // 2, len(self.time_mass_within) - 1)])

    def mass_in_box(self, k: int, kt: int) -> float:
        """Share of attention inside the k×k×kt box a 3-D ΔConv block's taps see."""
        t, s = self.box_mass.shape
        return float(self.box_mass[min((kt - 1) // 2, t - 1), min((k - 1) // 2, s - 1)])


def video_locality_stats(attn: torch.Tensor, query_tyx: torch.Tensor, grid: tuple[int, int, int],
                         uniform_quantile: float = 0.1) -> VideoLocalityStats:
    """attn: [Q, T·H·W] rows summing to 1; query_tyx: [Q, 3] integer (frame, y, x) of the queries on the grid."""
    attn, uniform, local = _split(attn, uniform_quantile)
    dt, dy, dx = _offsets(query_tyx.long(), grid)
    space = torch.maximum(dy.abs(), dx.abs())
    mass_within, erf = _profile(attn, local, space)
    time_mass, time_erf = _profile(attn, local, dt.abs())
    spatial = LocalityStats(_aligned(attn, dy, dx, *grid[1:]), mass_within.float(), uniform, erf,
                            nearest_odd(KERNEL_FRACTION * erf))
    s = int(space.max()) + 1
    box = torch.zeros(attn.shape[0], grid[0] * s, dtype=torch.float64).scatter_add_(1, dt.abs() * s + space, attn)
    box = box.view(-1, grid[0], s).cumsum(dim=1).cumsum(dim=2).mean(dim=0)
    return VideoLocalityStats(spatial, time_mass.float(), time_erf, time_erf, box.float())
