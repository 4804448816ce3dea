"""Fused [adaptive average pooling +] depthwise k×k convolution + gate for one ΔConv pyramid scale, in Triton.

    v [B, h, w, C] (channel-last, C = C_i) --dwconv k×k, zero padding k//2, weight [k, k, C] (+bias [C])--> [a | b]
    y = a·b·gate_constant ("scaled")  or  a·sigmoid(b) ("sigmoid")                              y: [B, h, w, C/2]

With `pool_to=(h, w)` the input is the full-resolution u [B, H, W, C], pooled once by torch's
adaptive_avg_pool2d (differentiable, channel-last) before the plain conv runs on the pooled tensor; in sampling the
full-resolution launch can write u pooled 2×2 instead (`fused_dwconv_gate_and_pool`).
The conv output (C channels) never reaches memory either: each program computes the a-half and the b-half of the
same channels for a tile of pixels and writes only the gated C/2 channels.

Design notes (why, not what):
* Channel-last tiles. A program owns TILE_H×TILE_W pixels × BLOCK_C channels. Channels are contiguous in memory, so
  every load of a [pixels, channels] tile is BLOCK_C-wide contiguous runs (coalesced / vectorised on the GPU); the
  k² shifted loads of neighbouring taps hit the same cache lines again (L1), so DRAM sees each input about once.
* Masking does the zero padding: a tap whose source pixel is outside the image loads 0 instead of branching, and
  the same mask covers partial tiles at the right/bottom edge and the channel tail (C/2 need not divide BLOCK_C).
* fp32 accumulation whatever the storage dtype (fp32/fp16/bf16): inputs are upcast after loading, the gate is
  evaluated in fp32, and only the final store rounds. a·b·√(C_i/2) would overflow fp16 far sooner if a and b
  were rounded first.
* The tap loops are runtime `range` loops (not unrolled): k is up to 17 here, and unrolling k² bodies would only
  bloat compile time for a memory-bound kernel.
* Pooling runs once, before the conv, not inside it. Pooling inside every tap (an earlier design) re-read each
  window k² times and, compiled for sm_90, cost ~6.4× the instructions per pixel of the plain conv: the ½-scale
  branch then took ~1.5× the full-resolution one on a quarter of the pixels. In sampling, for even H and W, the
  full-resolution launch writes the 2×2-pooled u as a side output (`fused_dwconv_gate_and_pool`): the pixels are
  the ones its tile just loaded, so it costs L1/L2 hits and a quarter-size write, and saves a launch and a pass
  over u. With gradients torch pools (its backward is the pooling's gradient).
* Launch parameters are plain integer maths cached per shape (launch.py).
* Tiles fill the GPU: at least 2 programs per SM where the grid allows (small SDXL/SD1.5 levels at 512² had
  10–96 programs on 132 SMs), shrinking pixel tiles before channel blocks; channel blocks divide the gated channel
  count where a power of two ≥ 16 does (80 → 16, 160 → 32), so no lane idles.
* Backward recomputes a and b (one more conv) rather than saving the C-channel pre-activation from the forward:
  the forward stays a single C/2-channel write, which matters for inference, the main use.
  1. _bwd_gate_kernel:   recompute a, b; dL/da, dL/db → dvc [B, h, w, C] in fp32 (gradient of the conv output).
  2. _bwd_input_kernel:  dL/dv = dvc correlated with the flipped kernel (same tile loop, taps mirrored).
  3. _bwd_weight_kernel: dL/dw[i,j,c] = Σ_pixels dvc·v(shifted by tap). A program owns a band of rows × a channel
     block and walks its pixels with all k² taps in one [taps, channels] fp32 accumulator: each dvc value is loaded
     once and meets its k² neighbours in v in one gathered load that hits L1 (the band's k live rows), so memory
     sees dvc once and v once plus a (k-1)-row halo per band. The design before, a program per tap, read both k²
     times (from L2) at 12–14 SASS instructions per FMA, against 3–4 now: 2.1–3× the modelled time. Taps
     padded to a power of two idle (49 of 64 used for k = 7). The partial sums [bands, k², C] (≤ 4 programs per
     SM: a few MB) are summed by torch: deterministic, no atomics, so training runs are reproducible.
  dL/dbias = Σ_pixels dvc, by torch. The pooling's gradient is torch's.
* Without gradients (sampling) the kernel is launched directly, not through autograd.Function.
* Offsets: the per-image base is computed in int64 (B·h·w·C may exceed 2³¹ on large batches); offsets inside one
  image stay int32 (h·w·C < 2³¹ is checked on the host; `use_triton` leaves larger images to torch).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .launch import cdiv, needs_grad, pow2, sm_count

# Tests may set this to e.g. dict(TILE_H=4, TILE_W=4, BLOCK_C=4) to force many tiles and partial tiles.
BLOCK_OVERRIDE: dict | None = None


# --------------------------------------------------------------------------------------------------- device code
# Only core tl builtins below: tl.zeros / tl.sigmoid / tl.sum are @triton.jit helpers of triton.language.standard,
# compiled-mode functions whenever triton was imported before TRITON_INTERPRET=1 was set, and then they fail under
# the interpreter. Our own helpers are decorated when this module is imported, in the right mode.
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tile_pixels(pid, tiles_w, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Row/column of every pixel of tile `pid` (tiles in raster order) and the in-image mask."""
    p = tl.arange(0, TILE_H * TILE_W)
    py = (pid // tiles_w) * TILE_H + p // TILE_W
    px = (pid % tiles_w) * TILE_W + p % TILE_W
    return py, px, (py < H) & (px < W)


@triton.jit
def _transposed_dwconv_tile(img, w_ptr, py, px, pmask, c, cmask, H, W, C,
                            K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ_{i,j} img[py - (i-K//2), px - (j-K//2), c] · w[i, j, c] in fp32, zero outside the H×W image: the depthwise
    conv with mirrored taps (the gradient w.r.t. its input)."""
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    cm = cmask[None, :]
    w_taps = w_ptr + c
    for i in range(K):
        sy = py - (i - K // 2)
        row_ok = pmask & (sy >= 0) & (sy < H)
        row = img + ((sy * W + px) * C)[:, None] + c[None, :]  # tap (i, centre column); columns shift by ±C
        for j in range(K):
            dx = K // 2 - j
            sx = px + dx
            ok = row_ok & (sx >= 0) & (sx < W)
            x = tl.load(row + dx * C, mask=ok[:, None] & cm, other=0.0).to(tl.float32)
            wt = tl.load(w_taps + (i * K + j) * C, mask=cmask, other=0.0)
            acc += x * wt.to(tl.float32)[None, :]
    return acc


@triton.jit
def _dwconv_tile_halves(img, w_ptr, py, px, pmask, c, cmask, H, W, C, HALF,
                        K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The forward conv of channels c (a) and c + HALF (b) in one loop nest: each tap's masks and addresses serve
    both halves (two nests recomputed them: ~30 % more SASS per FMA)."""
    acc_a = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    acc_b = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    cm = cmask[None, :]
    w_taps = w_ptr + c
    for i in range(K):
        sy = py + (i - K // 2)
        row_ok = pmask & (sy >= 0) & (sy < H)
        row = img + ((sy * W + px) * C)[:, None] + c[None, :]
        for j in range(K):
            dx = j - K // 2
            sx = px + dx
            mask = (row_ok & (sx >= 0) & (sx < W))[:, None] & cm
            src = row + dx * C
            taps = w_taps + (i * K + j) * C
            xa = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            xb = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
            acc_a += xa * tl.load(taps, mask=cmask, other=0.0).to(tl.float32)[None, :]
            acc_b += xb * tl.load(taps + HALF, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc_a, acc_b


@triton.jit
def _conv_halves(v_ptr, w_ptr, bias_ptr, H, W, C, HALF, tiles_w,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """This program's tile of the conv output of v [B, H, W, C], both halves: a (channels c) and b (c + C/2), fp32."""
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    py, px, pmask = _tile_pixels(tl.program_id(0), tiles_w, H, W, TILE_H, TILE_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < HALF
    img = v_ptr + tl.program_id(2).to(tl.int64) * H * W * C
    a, b = _dwconv_tile_halves(img, w_ptr, py, px, pmask, c, cmask, H, W, C, HALF, K, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        a += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        b += tl.load(bias_ptr + HALF + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return a, b, py, px, pmask, c, cmask


@triton.jit
def _pool_tile(v_ptr, pool_ptr, H, W, C, HALF, tiles_w, c, cmask,
               TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """pool[qy, qx] = mean of v's 2×2 pixels (2qy + {0,1}, 2qx + {0,1}) for the pooled pixels of this program's tile
    (H, W even, TILE_H, TILE_W ≥ 2), channels c and c + HALF, summed in fp32: the tile's own pixels, just loaded by
    the conv, so they come from L1/L2 rather than DRAM."""
    QH: tl.constexpr = TILE_H // 2
    QW: tl.constexpr = TILE_W // 2
    q = tl.arange(0, QH * QW)
    pid = tl.program_id(0)
    qy = (pid // tiles_w) * QH + q // QW
    qx = (pid % tiles_w) * QW + q % QW
    mask = ((qy < H // 2) & (qx < W // 2))[:, None] & cmask[None, :]
    image = tl.program_id(2).to(tl.int64)
    src = v_ptr + image * H * W * C + ((2 * qy * W + 2 * qx) * C)[:, None] + c[None, :]
    dst = pool_ptr + image * (H // 2) * (W // 2) * C + ((qy * (W // 2) + qx) * C)[:, None] + c[None, :]
    _pool_2x2(src, dst, W * C, C, mask)
    _pool_2x2(src + HALF, dst + HALF, W * C, C, mask)


@triton.jit
def _pool_2x2(src, dst, row, col, mask):
    total = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(src + col, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(src + row, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(src + row + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (total * 0.25).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(v_ptr, w_ptr, bias_ptr, y_ptr, pool_ptr, H, W, C, HALF, tiles_w, gate_constant,
                K: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, POOL: tl.constexpr,
                TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr):
    a, b, py, px, pmask, c, cmask = _conv_halves(v_ptr, w_ptr, bias_ptr, H, W, C, HALF, tiles_w, K, HAS_BIAS,
                                                 TILE_H, TILE_W, BLOCK_C)
    if SIGMOID:
        y = a * _sigmoid(b)
    else:
        y = a * b * gate_constant
    out = y_ptr + tl.program_id(2).to(tl.int64) * H * W * HALF
    tl.store(out + (py * W + px)[:, None] * HALF + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])
    if POOL:
        _pool_tile(v_ptr, pool_ptr, H, W, C, HALF, tiles_w, c, cmask, TILE_H, TILE_W)


@triton.jit
def _bwd_gate_kernel(v_ptr, w_ptr, bias_ptr, gy_ptr, dvc_ptr, H, W, C, HALF, tiles_w, gate_constant,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """dvc = dL/d(conv output), both halves, fp32, from the recomputed a, b and the incoming gradient gy."""
    a, b, py, px, pmask, c, cmask = _conv_halves(v_ptr, w_ptr, bias_ptr, H, W, C, HALF, tiles_w, K, HAS_BIAS,
                                                 TILE_H, TILE_W, BLOCK_C)
    mask = pmask[:, None] & cmask[None, :]
    pix = (py * W + px)[:, None]
    image = tl.program_id(2).to(tl.int64) * H * W
    g = tl.load(gy_ptr + image * HALF + pix * HALF + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if SIGMOID:
        s = _sigmoid(b)
        da = g * s
        db = g * a * s * (1.0 - s)
    else:
        da = g * b * gate_constant
        db = g * a * gate_constant
    out = dvc_ptr + image * C + pix * C + c[None, :]
    tl.store(out, da, mask=mask)
    tl.store(out + HALF, db, mask=mask)


@triton.jit
def _bwd_input_kernel(dvc_ptr, w_ptr, dv_ptr, H, W, C, tiles_w,
                      K: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """dv[p] = Σ_{i,j} dvc[p - (i,j) + pad] · w[i,j]: the transposed depthwise conv, as mirrored taps."""
    py, px, pmask = _tile_pixels(tl.program_id(0), tiles_w, H, W, TILE_H, TILE_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    image = tl.program_id(2).to(tl.int64) * H * W * C
    acc = _transposed_dwconv_tile(dvc_ptr + image, w_ptr, py, px, pmask, c, cmask, H, W, C, K, TILE_H * TILE_W,
                                  BLOCK_C)
    tl.store(dv_ptr + image + (py * W + px)[:, None] * C + c[None, :], acc.to(dv_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _bwd_weight_kernel(v_ptr, dvc_ptr, part_ptr, rows, H, W, C, band,
                       K: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[s, tap, c] = Σ over the pixels p of band s (flat rows b·H + y) of dvc[p, c] · v[p + tap, c] in fp32, all
    k² taps at once (TAPS: k² rounded up to a power of two, the rest masked off)."""
    t = tl.arange(0, TAPS)
    di = t // K - K // 2
    dj = t % K - K // 2
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    shifts = ((di * W + dj) * C)[:, None] + c[None, :]  # the k² sources of a pixel, relative to it
    x_first = tl.maximum(-dj, 0)  # tap t stays inside a row for x_first ≤ x < x_first + W - |dj|
    acc = tl.full([TAPS, BLOCK_C], 0.0, tl.float32)
    first = tl.program_id(0) * band
    for r in range(first, tl.minimum(first + band, rows)):
        y = r % H
        row_ok = (t < K * K) & (y + di >= 0) & (y + di < H)  # the source row is in image r // H
        x_count = tl.where(row_ok, tl.maximum(W - tl.abs(dj), 0), 0).to(tl.uint32)
        offset = tl.cast(r, tl.int64) * W * C
        for x in range(W):
            ok = (x - x_first).to(tl.uint32) < x_count  # both column bounds and the row's: one compare per tap
            d = tl.load(dvc_ptr + offset + x * C + c, mask=cmask, other=0.0)
            src = tl.load(v_ptr + offset + x * C + shifts, mask=ok[:, None] & cmask[None, :], other=0.0)
            acc += src.to(tl.float32) * d[None, :]
    tl.store(part_ptr + (tl.program_id(0) * K * K + t)[:, None] * C + c[None, :], acc,
             mask=(t < K * K)[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------------- host code
MIN_PROGRAMS_PER_SM = 2  # below this a launch's time is one program's latency, not the GPU's throughput


class Launch(NamedTuple):
    blocks: dict  # TILE_H, TILE_W, BLOCK_C
    grid: tuple  # (pixel tiles, channel blocks, images)
    tiles_w: int
    num_warps: int
    sms: int  # of the GPU planned for; 0: Triton's CPU interpreter


def _channel_block(channels: int, on_gpu: bool) -> int:
    """GPU: the largest power of two ≤ 64 that divides `channels`, when it is ≥ 16 (80 → 16, 160 → 32, 320 → 64:
    no idle lanes); otherwise, and under the interpreter, up to 64 with the tail masked."""
    divisor = min(64, channels & -channels)  # the lowest set bit: the largest power-of-two divisor
    return divisor if on_gpu and divisor >= 16 else min(64, pow2(channels))


@functools.cache
def _planned_launch(h: int, w: int, channels: int, images: int, sms: int) -> Launch:
    """GPU tiles: a 16-wide strip of up to 64 pixels × the channel block (128 B of fp16 per pixel at 64 channels),
    shrunk (pixels first, to 16, rows before columns but keeping 2 × 2; then channels, to 16) until there are
    MIN_PROGRAMS_PER_SM programs per SM.
    sms = 0: Triton's CPU interpreter, where every program is slow Python: tiles up to 32×32 pixels, fewest programs."""
    on_gpu = sms > 0
    tile_w = min(16 if on_gpu else 32, pow2(w))
    tile_h = min(max(64 // tile_w, 1) if on_gpu else 32, pow2(h))
    block_c = _channel_block(channels, on_gpu)

    def programs():
        return cdiv(h, tile_h) * cdiv(w, tile_w) * cdiv(channels, block_c) * images

    while on_gpu and programs() < MIN_PROGRAMS_PER_SM * sms:
        if tile_h * tile_w > 16:  # rows first, down to 2: tiles of 2×2-aligned pixels can pool (POOL)
            tile_h, tile_w = (tile_h // 2, tile_w) if tile_h > 2 or tile_w <= 2 else (tile_h, tile_w // 2)
        elif block_c > 16:
            block_c //= 2
        else:
            break
    return _launch(h, w, channels, images, dict(TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c), sms)


def _launch(h: int, w: int, channels: int, images: int, blocks: dict, sms: int) -> Launch:
    tiles_w = cdiv(w, blocks["TILE_W"])
    grid = (cdiv(h, blocks["TILE_H"]) * tiles_w, cdiv(channels, blocks["BLOCK_C"]), images)
    # ≥ 16 elements per thread where the tile has them: fewer spread thinner pay address and mask maths per FMA
    # (sm_90: 7.9 SASS instructions per FMA at 4 per thread, 4.4 at 16)
    warps = max(1, min(4, blocks["TILE_H"] * blocks["TILE_W"] * blocks["BLOCK_C"] // 512))
    return Launch(blocks, grid, tiles_w, warps, sms)


def plan_launch(h: int, w: int, channels: int, images: int, device: torch.device) -> Launch:
    """Tiles, grid and warps for an h×w image of `channels` (gated) channels; BLOCK_OVERRIDE wins (tests)."""
    sms = sm_count(device.index or 0) if device.type == "cuda" else 0
    if BLOCK_OVERRIDE is not None:
        return _launch(h, w, channels, images, dict(BLOCK_OVERRIDE), sms)
    return _planned_launch(h, w, channels, images, sms)


def _check(v, weight, bias, gate, pool_to):
    if gate not in ("scaled", "sigmoid"):
        raise ValueError(f"gate must be 'scaled' or 'sigmoid', got {gate!r}")
    if v.dim() != 4 or v.shape[-1] % 2:
        raise ValueError(f"v must be [B, h, w, C] with an even C, got {tuple(v.shape)}")
    k = weight.shape[0]
    if weight.shape != (k, k, v.shape[-1]) or k % 2 == 0:
        raise ValueError(f"weight must be [k, k, {v.shape[-1]}] with odd k, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (v.shape[-1],):
        raise ValueError(f"bias must be [{v.shape[-1]}], got {tuple(bias.shape)}")
    if pool_to is not None and (len(pool_to) != 2 or min(pool_to) < 1 or min(v.shape[1:3]) < 1):
        raise ValueError(f"pool_to must be a positive (h, w) and the input non-empty, got {pool_to} for "
                         f"{tuple(v.shape)}")
    if v[:1].numel() >= 2**31:
        raise ValueError(f"one image of {tuple(v.shape[1:])} is too large for the kernel's int32 offsets")
    if weight.device != v.device or (bias is not None and bias.device != v.device):
        raise ValueError("v, weight and bias must be on the same device")


def _backward(v, weight, bias, gy, sigmoid, gate_constant, need_v, need_w, need_b):
    """(dL/dv, dL/dweight, dL/dbias) of the unpooled dwconv + gate on v [B, H, W, C]; None where not needed."""
    B, H, W, C = v.shape
    k, half = weight.shape[0], C // 2
    gy = gy.contiguous()
    dvc = torch.empty(B, H, W, C, device=v.device, dtype=torch.float32)  # fp32: summed over pixels below
    if dvc.numel() == 0:
        return (torch.zeros_like(v) if need_v else None, torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(bias) if need_b else None)
    gate = plan_launch(H, W, half, B, v.device)
    _bwd_gate_kernel[gate.grid](v, weight, v if bias is None else bias, gy, dvc, H, W, C, half, gate.tiles_w,
                                gate_constant, K=k, HAS_BIAS=bias is not None, SIGMOID=sigmoid,
                                num_warps=gate.num_warps, **gate.blocks)
    dv = dw = db = None
    full = plan_launch(H, W, C, B, v.device)
    if need_v:
        dv = torch.empty_like(v)
        _bwd_input_kernel[full.grid](dvc, weight, dv, H, W, C, full.tiles_w, K=k, num_warps=full.num_warps,
                                     **full.blocks)
    if need_w:
        dw = _weight_grad(v, dvc, k, full.sms).to(weight.dtype)
    if need_b and bias is not None:
        db = dvc.sum(dim=(0, 1, 2)).to(bias.dtype)
    return dv, dw, db


@functools.cache
def _weight_plan(rows: int, channels: int, taps: int, sms: int) -> tuple[int, int]:
    """(band rows, channel block) of the weight gradient. GPU: a channel block that divides C where one does, with
    ≤ 4096 accumulators (32 per thread); bands for at most 4 programs per SM (one wave, fewer partial sums).
    Interpreter (sms = 0): one band, 64 channels."""
    if not sms:
        return rows, min(64, pow2(channels))
    block_c = min(_channel_block(channels, True), max(16, 4096 // taps))
    return cdiv(rows, max(1, min(rows, 4 * sms // cdiv(channels, block_c)))), block_c


def _weight_grad(v, dvc, k: int, sms: int):
    """dL/dweight [k, k, C] in fp32 from contiguous v [B, H, W, C] and dvc = dL/d(conv output) (fp32, same shape);
    planned for `sms` SMs (0: the interpreter). BLOCK_OVERRIDE (tests): bands of TILE_H rows, BLOCK_C channels."""
    B, H, W, C = v.shape
    taps = pow2(k * k)
    if BLOCK_OVERRIDE is not None:
        band, block_c = BLOCK_OVERRIDE["TILE_H"], BLOCK_OVERRIDE["BLOCK_C"]
    else:
        band, block_c = _weight_plan(B * H, C, taps, sms)
    bands = cdiv(B * H, band)
    part = torch.empty(bands, k * k, C, device=v.device, dtype=torch.float32)
    _bwd_weight_kernel[(bands, cdiv(C, block_c))](v, dvc, part, B * H, H, W, C, band, K=k, TAPS=taps,
                                                  BLOCK_C=block_c, num_warps=max(1, min(4, taps * block_c // 1024)))
    return part.sum(0).view(k, k, C)


def _forward(v, weight, bias, sigmoid: bool, gate_constant: float, pool: bool = False):
    """y [B, H, W, C/2] of the dwconv + gate on contiguous v [B, H, W, C]; with `pool`, (y, v pooled 2×2
    [B, H/2, W/2, C]) from the same launch, or (y, None) where H or W is odd or the tiles are one pixel high or
    wide."""
    B, H, W, C = v.shape
    half = C // 2
    y = torch.empty(B, H, W, half, device=v.device, dtype=v.dtype)
    launch = plan_launch(H, W, half, B, v.device) if y.numel() else None
    pooled = None
    if pool and launch and H % 2 == W % 2 == 0 and min(launch.blocks["TILE_H"], launch.blocks["TILE_W"]) >= 2:
        pooled = torch.empty(B, H // 2, W // 2, C, device=v.device, dtype=v.dtype)
    if launch:
        _fwd_kernel[launch.grid](v, weight, v if bias is None else bias, y, v if pooled is None else pooled,
                                 H, W, C, half, launch.tiles_w, float(gate_constant), K=weight.shape[0],
                                 HAS_BIAS=bias is not None, SIGMOID=sigmoid, POOL=pooled is not None,
                                 num_warps=launch.num_warps, **launch.blocks)
    return (y, pooled) if pool else y


class _FusedDwconvGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, weight, bias, sigmoid: bool, gate_constant: float):
        ctx.save_for_backward(v, weight, bias)
        ctx.sigmoid, ctx.gate_constant = sigmoid, float(gate_constant)
        return _forward(v, weight, bias, sigmoid, gate_constant)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        v, weight, bias = ctx.saved_tensors
        return (*_backward(v, weight, bias, gy, ctx.sigmoid, ctx.gate_constant, *ctx.needs_input_grad[:3]),
                None, None)


def fused_dwconv_gate(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: str,
                      gate_constant: float, pool_to: tuple[int, int] | None = None) -> torch.Tensor:
    """[Adaptive average pooling +] depthwise conv + gate of one pyramid scale, differentiable w.r.t. v, weight, bias.

    v: [B, H, W, C] channel-last (made contiguous if it is not); weight: [k, k, C], k odd; bias: [C] or None;
    gate: "scaled" (a·b·gate_constant) or "sigmoid" (a·sigmoid(b), gate_constant ignored); pool_to: (h, w) to
    convolve adaptive_avg_pool2d(v, (h, w)) instead of v, or None.
    Returns y: [B, h, w, C/2] ((h, w) = pool_to or (H, W)) in v's dtype (fp32 accumulation inside); gradients
    come back in each input's dtype.
    """
    v, weight, bias = _prepared(v, weight, bias, gate, pool_to)
    sigmoid = gate == "sigmoid"
    if needs_grad(v, weight, bias):
        return _FusedDwconvGate.apply(v, weight, bias, sigmoid, gate_constant)
    return _forward(v, weight, bias, sigmoid, gate_constant)


def _prepared(v, weight, bias, gate, pool_to):
    """The checked arguments, contiguous, v pooled to pool_to (torch pools channel-last in one pass, fp32
    accumulation, with its own gradient)."""
    pool_to = None if pool_to is None else tuple(int(n) for n in pool_to)
    _check(v, weight, bias, gate, pool_to)
    if pool_to is not None:
        v = F.adaptive_avg_pool2d(v.permute(0, 3, 1, 2), pool_to).permute(0, 2, 3, 1)
    return v.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()


def fused_dwconv_gate_and_pool(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: str,
                               gate_constant: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampling only (no autograd): `fused_dwconv_gate(v, weight, bias, gate, gate_constant)` at full resolution,
    and v pooled 2×2 as a side output of the same launch: adaptive_avg_pool2d(v, (H/2, W/2)) for even H, W, the
    ½ scale's input without a pooling pass over v. The pooled tensor is None where H or W is odd or the planned
    tiles are a single row or column: pool with torch then."""
    v, weight, bias = _prepared(v, weight, bias, gate, None)
    return _forward(v, weight, bias, gate == "sigmoid", gate_constant, pool=True)


__all__ = ["fused_dwconv_gate", "fused_dwconv_gate_and_pool"]
