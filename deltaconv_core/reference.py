"""Plain references of the ΔConvBlock and MediatorAttention maths, written independently of `block.py` and
`mediators.py` (explicit loops, einsum, written-out softmax).

Every fast path is tested against these in float64. They read the same state dicts as the modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .block import BlockConfig


def adaptive_avg_pool_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows: [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)) in integer arithmetic."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def reference_adaptive_avg_pool(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """x: [B, C, H, W] → [B, C, h, w], one window at a time."""
    rows = adaptive_avg_pool_windows(x.shape[2], out_hw[0])
    cols = adaptive_avg_pool_windows(x.shape[3], out_hw[1])
    out = x.new_empty(x.shape[0], x.shape[1], out_hw[0], out_hw[1])
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def _bilinear_taps(n_in: int, n_out: int):
    """Source indices and weights along one axis, align_corners=False, neighbours clamped to the edge."""
    taps = []
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        taps.append((i0, i1, 1.0 - frac, frac))
    return taps


def reference_bilinear_resize(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """x: [B, C, h, w] → [B, C, H, W] as a separable weighted sum of explicit taps."""
    rows = _bilinear_taps(x.shape[2], out_hw[0])
    cols = _bilinear_taps(x.shape[3], out_hw[1])
    tmp = torch.stack([x[:, :, i0] * w0 + x[:, :, i1] * w1 for i0, i1, w0, w1 in rows], dim=2)
    return torch.stack([tmp[:, :, :, i0] * w0 + tmp[:, :, :, i1] * w1 for i0, i1, w0, w1 in cols], dim=3)


def reference_block_forward(state: dict, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
    """x: [B, H, W, C] → [B, H, W, C], computed in x's dtype with NCHW tensors and 1×1 convolutions."""
    p = {k: v.to(x.dtype) for k, v in state.items()}
    _B, H, W, _C = x.shape
    xc = x.permute(0, 3, 1, 2).contiguous()  # NCHW

    def pointwise(t, name):
        w = p[f"{name}.weight"]
        return F.conv2d(t, w[:, :, None, None], p[f"{name}.bias"])

    u = pointwise(xc, "conv_up")
    z = pointwise(_reference_pyramid(p, config, u), "conv_out")
    pooled = pointwise(xc.sum(dim=(2, 3), keepdim=True) / (H * W), "conv_pool")
    return (z + pooled).permute(0, 2, 3, 1)


def _reference_pyramid(p: dict, config: BlockConfig, u: torch.Tensor) -> torch.Tensor:
    """conv_up's output u: [N, C_i, H, W] → the gated scales concatenated, [N, n·C_i/2, H, W]."""
    _N, ci, H, W = u.shape
    outs = []
    for i, s in enumerate(config.scales):
        v = u
        if s != 1.0:
            v = reference_adaptive_avg_pool(v, (max(1, int(H * s)), max(1, int(W * s))))
        k = p[f"gates.{i}.conv_spatial.weight"]  # [k, k, C_i]
        kernel = k.permute(2, 0, 1).reshape(ci, 1, k.shape[0], k.shape[1])
        v = F.conv2d(F.pad(v, [k.shape[0] // 2] * 4), kernel, p.get(f"gates.{i}.conv_spatial.bias"), groups=ci)
        a, b = v[:, : ci // 2], v[:, ci // 2 :]
        y = a * b / (ci / 2) ** -0.5 if config.gate == "scaled" else a / (1 + torch.exp(-b))
        if s != 1.0:
            y = reference_bilinear_resize(y, (H, W))
        outs.append(y)
    return torch.cat(outs, dim=1)


def reference_video_block_forward(state: dict, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, W, C] → [B, T, H, W, C] in x's dtype: einsum projections, conv_time as shifted sums along T
    (zero beyond the clip) added to conv_up's output, the pyramid per frame as in the image reference, and the
    pooled branch on the mean over the whole clip."""
    p = {k: v.to(x.dtype) for k, v in state.items()}
    B, T, H, W, _C = x.shape
    u = torch.einsum("btyxc,oc->btyxo", x, p["conv_up.weight"]) + p["conv_up.bias"]
    if "conv_time.weight" in p:
        k_t = p["conv_time.weight"].shape[0]
        padded = x.new_zeros(B, T + k_t - 1, H, W, u.shape[-1])
        padded[:, k_t // 2:k_t // 2 + T] = u
        u = u + sum(padded[:, i:i + T] * p["conv_time.weight"][i] for i in range(k_t))
    y = _reference_pyramid(p, config, u.reshape(B * T, H, W, -1).permute(0, 3, 1, 2))
    z = torch.einsum("ncyx,oc->nyxo", y, p["conv_out.weight"]) + p["conv_out.bias"]
    pooled = x.sum(dim=(1, 2, 3)) / (T * H * W) @ p["conv_pool.weight"].t() + p["conv_pool.bias"]  # [B, C]
    return z.reshape(B, T, H, W, -1) + pooled[:, None, None, None]


def reference_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, written out (max-shifted exponentials over their sum)."""
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def reference_mediator_forward(state: dict, heads: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MediatorAttention on x: [B, H, W, C] with an explicit (p_h, p_w) mediator grid, in x's dtype: einsum
    projections, explicit pooling windows, per-head written-out softmaxes, the 3×3 DWC as nine shifted sums."""
    p = {k: v.to(x.dtype) for k, v in state.items()}
    B, H, W, C = x.shape
    d = C // heads
    qkv = torch.einsum("byxc,oc->byxo", x, p["qkv.weight"]) + p["qkv.bias"]
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    t = reference_adaptive_avg_pool(q.permute(0, 3, 1, 2), grid).reshape(B, C, grid[0] * grid[1])  # raster order
    q, k, v_tokens = (z.reshape(B, H * W, C) for z in (q, k, v))
    out = torch.zeros_like(q)
    for head in range(heads):
        c = slice(head * d, (head + 1) * d)
        mediator_to_keys = reference_softmax(torch.einsum("bdm,bjd->bmj", t[:, c], k[..., c]) / math.sqrt(d))
        v_mediated = torch.einsum("bmj,bjd->bmd", mediator_to_keys, v_tokens[..., c])
        query_to_mediators = reference_softmax(torch.einsum("bid,bdm->bim", q[..., c], t[:, c]) / math.sqrt(d))
        out[..., c] = torch.einsum("bim,bmd->bid", query_to_mediators, v_mediated)
    padded = x.new_zeros(B, H + 2, W + 2, C)
    padded[:, 1:-1, 1:-1] = v
    dwc = p["dwc.bias"] + sum(padded[:, i:i + H, j:j + W] * p["dwc.weight"][i, j] for i in range(3) for j in range(3))
    out = out.reshape(B, H, W, C) + dwc
    return torch.einsum("byxc,oc->byxo", out, p["proj.weight"]) + p["proj.bias"]


def reference_video_mediator_forward(state: dict, heads: int, x: torch.Tensor, grid: tuple[int, int, int],
                                     eps: float | None = None) -> torch.Tensor:
    """Video MediatorAttention on x: [B, T, H, W, C] with an explicit (p_t, p_h, p_w) mediator grid: q/k RMSNorm
    written out (when `eps` is given), mediators as explicit 3-D windows in raster order, per-head softmaxes, the
    3×3 DWC per frame as nine shifted sums plus the DWC over time as shifted sums along T."""
    p = {k: v.to(x.dtype) for k, v in state.items()}
    B, T, H, W, C = x.shape
    d, n = C // heads, T * H * W
    qkv = torch.einsum("btyxc,oc->btyxo", x, p["qkv.weight"]) + p["qkv.bias"]
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    if eps is not None:
        q = q / torch.sqrt((q * q).mean(dim=-1, keepdim=True) + eps) * p["norm_q.weight"]
        k = k / torch.sqrt((k * k).mean(dim=-1, keepdim=True) + eps) * p["norm_k.weight"]
    windows = [adaptive_avg_pool_windows(size, cells) for size, cells in zip((T, H, W), grid)]
    t = torch.stack([q[:, f0:f1, r0:r1, c0:c1].mean(dim=(1, 2, 3)) for f0, f1 in windows[0]
                     for r0, r1 in windows[1] for c0, c1 in windows[2]], dim=1)  # [B, n_mediators, C]
    q, k, v_tokens = (z.reshape(B, n, C) for z in (q, k, v))
    out = torch.zeros_like(q)
    for head in range(heads):
        c = slice(head * d, (head + 1) * d)
        mediator_to_keys = reference_softmax(torch.einsum("bmd,bjd->bmj", t[..., c], k[..., c]) / math.sqrt(d))
        v_mediated = torch.einsum("bmj,bjd->bmd", mediator_to_keys, v_tokens[..., c])
        query_to_mediators = reference_softmax(torch.einsum("bid,bmd->bim", q[..., c], t[..., c]) / math.sqrt(d))
        out[..., c] = torch.einsum("bim,bmd->bid", query_to_mediators, v_mediated)
    padded = x.new_zeros(B, T, H + 2, W + 2, C)
    padded[:, :, 1:-1, 1:-1] = v
    dwc = p["dwc.bias"] + sum(padded[:, :, i:i + H, j:j + W] * p["dwc.weight"][i, j]
                              for i in range(3) for j in range(3))
    if "dwc_time.weight" in p:
        k_t = p["dwc_time.weight"].shape[0]
        padded = x.new_zeros(B, T + k_t - 1, H, W, C)
        padded[:, k_t // 2:k_t // 2 + T] = v
        dwc = dwc + p["dwc_time.bias"] + sum(padded[:, i:i + T] * p["dwc_time.weight"][i] for i in range(k_t))
    out = out.reshape(B, T, H, W, C) + dwc
    return torch.einsum("btyxc,oc->btyxo", out, p["proj.weight"]) + p["proj.bias"]
