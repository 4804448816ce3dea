"""Attention-locality statistics (the paper's analysis): how local is a self-attention layer, and which kernel fits.

Input: attention probabilities of some query positions over the image tokens of one layer (heads averaged).
All statistics use Chebyshev distance, so "within d" means inside the (2d+1)×(2d+1) window a k×k kernel sees.
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


def _offsets(query_yx: torch.Tensor, grid: tuple[int, int]):
    """Per query, the (dy, dx) of every token relative to the query: [Q, N] each."""
    h, w = grid
    ys = torch.arange(h).repeat_interleave(w)
    xs = torch.arange(w).repeat(h)
    return ys[None] - query_yx[:, :1], xs[None] - query_yx[:, 1:]


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Head-averaged softmax(q·kᵀ/√d) of one image: q [Q, C] (the chosen queries), k [N, C] → [Q, N], fp32."""
    d = q.shape[-1] // heads
    q = q.float().view(-1, heads, d).transpose(0, 1)
    k = k.float().view(-1, heads, d).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1).mean(dim=0)


def nearest_odd(x: float) -> int:
    """The odd kernel size closest to x (at least 1)."""
    return max(1, 2 * round((x - 1) / 2) + 1)


def locality_stats(attn: torch.Tensor, query_yx: torch.Tensor, grid: tuple[int, int],
                   uniform_quantile: float = 0.1) -> LocalityStats:
    """attn: [Q, H·W] rows summing to 1; query_yx: [Q, 2] integer positions of the queries on the grid."""
    h, w = grid
    attn = attn.double()
    attn = attn / attn.sum(dim=1, keepdim=True)
    dy, dx = _offsets(query_yx.long(), grid)
    aligned = torch.zeros(2 * h - 1, 2 * w - 1, dtype=torch.float64)
    aligned.index_put_(((dy + h - 1).flatten(), (dx + w - 1).flatten()), attn.flatten(), accumulate=True)
    aligned /= attn.shape[0]
    # The uniform part: what every token gets at least (a low quantile of each map), summed over the image.
    floor = torch.quantile(attn, uniform_quantile, dim=1, keepdim=True)
    uniform = float((floor * attn.shape[1]).mean().clamp(0, 1))
    dist = torch.maximum(dy.abs(), dx.abs())
    max_d = int(dist.max())
    mass = torch.zeros(attn.shape[0], max_d + 1, dtype=torch.float64).scatter_add_(1, dist, attn)
    mass_within = mass.cumsum(dim=1).mean(dim=0)
    local = (attn - floor).clamp(min=0)
    total = local.sum(dim=1, keepdim=True)
    if float(total.max()) <= 1e-12:  # nothing but the uniform part: the whole image is the receptive field
        erf = 2 * max_d + 1
    else:
        local_mass = torch.zeros_like(mass).scatter_add_(1, dist, local / total.clamp(min=1e-12))
        curve = local_mass.cumsum(dim=1).mean(dim=0)
        erf = 2 * int((curve >= MASS_TARGET - 1e-9).nonzero()[0]) + 1
    return LocalityStats(aligned.float(), mass_within.float(), uniform, erf, nearest_odd(KERNEL_FRACTION * erf))
