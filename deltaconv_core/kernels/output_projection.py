"""Fused output projection of the ΔConvBlock, in Triton (forward; backward with torch ops).

    out[b, p, :] = image_bias[b] + bias + Σ_s up_s(y_s)[b, p] · W[:, s·Cb:(s+1)·Cb]ᵀ           out: [B, H, W, C]

y_0 [B, H, W, Cb] is the full-resolution branch; y_1, y_2, … [B, h_s, w_s, Cb] are the pooled branches, read at
their own resolution and upsampled on the fly (bilinear, align_corners=False, exactly F.interpolate(size=(H, W))),
so neither the upsampled branches nor their concatenation (conv_out's input) ever reach memory. W is conv_out's
weight [C, n·Cb]; image_bias [B, C] = conv_pool(mean x), one vector per image; bias [C] = conv_out.bias, added
here rather than to image_bias by a launch of its own.

Design notes (why, not what):
* A program owns BLOCK_M pixels of one image × BLOCK_N output channels and walks the concatenated input channels in
  BLOCK_K chunks, branch by branch: a pooled branch's chunk is four bilinear taps blended in fp32 and rounded to the
  storage dtype (as F.interpolate's output is), then tl.dot with fp32 accumulation. Block dims are ≥ 16 (tl.dot),
  tails are masked to zero on both operands.
* Output-channel blocks are the fastest-varying program id, so the programs sharing a pixel tile run together and
  its branch tiles come from L2 after the first; one flat axis also avoids CUDA's 65535 limit on grid axes 1 and 2.
* The store offset is int64 (B·H·W·C and even H·W·C may pass 2³¹); branch offsets stay int32 (a branch image is
  smaller than the gate input, which `use_triton` keeps under 2³¹).
* Up to MAX_BRANCHES branches (pointer arguments are fixed); the block falls back to torch beyond that.
* Backward (torch): dL/dbias = Σ_p g; per pooled branch the adjoint of the upsampling, G_s = upᵀ(g) [B, h_s, w_s, C]
  (aten's upsample_bilinear2d_backward), gives both dL/dy_s = G_s·W_s and dL/dW_s = G_sᵀ·y_s at low resolution,
  so nothing of full resolution is made besides dL/dy_0. Saved for backward: the branches as they came (the
  pooled ones at low resolution), never their upsampled concatenation.
* Triton's interpreter multiplies bf16 dot operands as raw integers, so under the interpreter bf16 tiles go to
  tl.dot as fp32 (UPCAST); compiled, tl.dot gets the storage dtype. fp32 inputs use tf32 only where torch would
  (torch.get_float32_matmul_precision() != "highest").
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import MAX_BRANCHES, interpreter_mode
from .launch import capability, cdiv, needs_grad, pow2

# Tests may set this to e.g. dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) to force many tiles and partial tiles.
BLOCK_OVERRIDE: dict | None = None


# --------------------------------------------------------------------------------------------------- device code
# Only core tl builtins (no tl.zeros, tl.cdiv …): see dwconv_gate.py.
@triton.jit
def _branch(acc, y_img, w_cols, p, py, px, pmask, n, nmask, hs, ws, scale_h, scale_w, CB, KW,
            UPSAMPLE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += branch tile [BLOCK_M, CB] · W[n, cols]ᵀ; with UPSAMPLE the branch is [hs, ws, CB] read bilinearly."""
    if UPSAMPLE:
        # F.interpolate(align_corners=False): src = max((dst + ½)·in/out − ½, 0), lower neighbour ⌊src⌋ (int()
        # of a non-negative float), upper neighbour clamped to the last row/column.
        sy = tl.maximum((py.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
        sx = tl.maximum((px.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
        y0 = tl.minimum(sy.to(tl.int32), hs - 1)
        x0 = tl.minimum(sx.to(tl.int32), ws - 1)
        ly = (sy - y0.to(tl.float32))[:, None]
        lx = (sx - x0.to(tl.float32))[:, None]
        f00 = (1.0 - ly) * (1.0 - lx)
        f01 = (1.0 - ly) * lx
        f10 = ly * (1.0 - lx)
        f11 = ly * lx
        y1 = tl.minimum(y0 + 1, hs - 1)
        x1 = tl.minimum(x0 + 1, ws - 1)
        r00 = ((y0 * ws + x0) * CB)[:, None]
        r01 = ((y0 * ws + x1) * CB)[:, None]
        r10 = ((y1 * ws + x0) * CB)[:, None]
        r11 = ((y1 * ws + x1) * CB)[:, None]
    for k0 in range(0, CB, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < CB
        m = pmask[:, None] & kmask[None, :]
        if UPSAMPLE:
            src = y_img + k[None, :]
            a = f00 * tl.load(src + r00, mask=m, other=0.0).to(tl.float32)
            a += f01 * tl.load(src + r01, mask=m, other=0.0).to(tl.float32)
            a += f10 * tl.load(src + r10, mask=m, other=0.0).to(tl.float32)
            a += f11 * tl.load(src + r11, mask=m, other=0.0).to(tl.float32)
            a = a.to(y_img.dtype.element_ty)
        else:
            a = tl.load(y_img + (p * CB)[:, None] + k[None, :], mask=m, other=0.0)
        wt = tl.load(w_cols + (n * KW)[None, :] + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _projection_kernel(y0_ptr, y1_ptr, y2_ptr, y3_ptr, w_ptr, image_bias_ptr, bias_ptr, out_ptr, H, W, C, CB, KW,
                       n_blocks, h1, w1, h2, w2, h3, w3, sh1, sw1, sh2, sw2, sh3, sw3,
                       BRANCHES: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    p = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = p < H * W
    nmask = n < C
    py = p // W
    px = p % W
    image = tl.program_id(1).to(tl.int64)
    bias = tl.load(image_bias_ptr + image * C + n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32) + bias[None, :]
    acc = _branch(acc, y0_ptr + image * H * W * CB, w_ptr, p, py, px, pmask, n, nmask, H, W, 1.0, 1.0, CB, KW,
                  False, UPCAST, PRECISION, BLOCK_K)
    if BRANCHES > 1:
        acc = _branch(acc, y1_ptr + image * h1 * w1 * CB, w_ptr + CB, p, py, px, pmask, n, nmask, h1, w1, sh1, sw1,
                      CB, KW, True, UPCAST, PRECISION, BLOCK_K)
    if BRANCHES > 2:
        acc = _branch(acc, y2_ptr + image * h2 * w2 * CB, w_ptr + 2 * CB, p, py, px, pmask, n, nmask, h2, w2, sh2,
                      sw2, CB, KW, True, UPCAST, PRECISION, BLOCK_K)
    if BRANCHES > 3:
        acc = _branch(acc, y3_ptr + image * h3 * w3 * CB, w_ptr + 3 * CB, p, py, px, pmask, n, nmask, h3, w3, sh3,
                      sw3, CB, KW, True, UPCAST, PRECISION, BLOCK_K)
    out = out_ptr + image * H * W * C + p.to(tl.int64)[:, None] * C + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------------- host code
def _launch_config(pixels: int, c: int, cb: int, branches: int, dtype: torch.dtype, arch: tuple[int, int] | None):
    """(blocks, num_warps, num_stages) for a CUDA compute capability `arch` (None: the CPU interpreter).
    Ampere+: 64 pixels × up to 128 output channels (64 in fp32) over 8 warps, K chunks of up to 32 channels (16
    with more than two branches or in fp32) that divide Cb where they can; older GPUs: 32×64×16 over 4 warps.
    Larger tiles spill registers (checked with ptxas for sm_75/80/90: the four bilinear taps are live beside the
    accumulator). Interpreter: one program per image where it fits (each program is slow Python there)."""
    if BLOCK_OVERRIDE is not None:
        return dict(BLOCK_OVERRIDE), 4, 2
    return _planned_config(pixels, c, cb, branches, dtype, arch)


@functools.cache
def _planned_config(pixels: int, c: int, cb: int, branches: int, dtype: torch.dtype, arch: tuple[int, int] | None):
    if arch is None:
        return dict(BLOCK_M=max(16, min(1024, pow2(pixels))), BLOCK_N=max(16, pow2(c)),
                    BLOCK_K=max(16, pow2(cb))), 4, 2
    if arch < (8, 0):
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16), 4, 2
    fp32 = dtype == torch.float32
    max_k = 32 if branches <= 2 and not fp32 else 16
    return dict(BLOCK_M=64, BLOCK_N=max(16, min(64 if fp32 else 128, pow2(c))),
                BLOCK_K=max(16, min(max_k, cb & -cb))), 8, 3


def device_arch(t: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability the launch is planned for; None: Triton's CPU interpreter."""
    return capability(t.device.index or 0) if t.is_cuda else None


def _check(ys, weight, image_bias, bias):
    if not 1 <= len(ys) <= MAX_BRANCHES:
        raise ValueError(f"1 to {MAX_BRANCHES} branches, got {len(ys)}")
    y0 = ys[0]
    if any(y.dim() != 4 or y.shape[0] != y0.shape[0] or y.shape[3] != y0.shape[3] or min(y.shape[1:3]) < 1
           for y in ys):
        raise ValueError(f"branches must be non-empty [B, h, w, Cb] with one B and Cb, got "
                         f"{[tuple(y.shape) for y in ys]}")
    if weight.dim() != 2 or weight.shape[1] != len(ys) * y0.shape[3]:
        raise ValueError(f"weight must be [C, {len(ys) * y0.shape[3]}], got {tuple(weight.shape)}")
    if image_bias.shape != (y0.shape[0], weight.shape[0]):
        raise ValueError(f"image_bias must be [{y0.shape[0]}, {weight.shape[0]}], got {tuple(image_bias.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if any(y.dtype != y0.dtype for y in ys) or weight.dtype != y0.dtype:
        raise ValueError(f"branches and weight must share one dtype, got {[y.dtype for y in ys]} and {weight.dtype}")
    if any(t is not None and t.device != y0.device for t in (*ys, weight, image_bias, bias)):
        raise ValueError("branches, weight, image_bias and bias must be on the same device")


def _forward(weight, image_bias, bias, ys):
    """[B, H, W, C] from contiguous branches, weight, image_bias and bias (see fused_output_projection)."""
    B, H, W, cb = ys[0].shape
    C = weight.shape[0]
    out = torch.empty(B, H, W, C, device=ys[0].device, dtype=ys[0].dtype)
    if out.numel():
        blocks, num_warps, num_stages = _launch_config(H * W, C, cb, len(ys), ys[0].dtype, device_arch(ys[0]))
        n_blocks = cdiv(C, blocks["BLOCK_N"])
        low = ys[1:] + [ys[0]] * (MAX_BRANCHES - len(ys))  # unused pointer slots: any valid tensor
        sizes = [n for y in ys[1:] for n in y.shape[1:3]] + [1] * 2 * (MAX_BRANCHES - len(ys))
        scales = [n_in / n_out for y in ys[1:] for n_in, n_out in zip(y.shape[1:3], (H, W))]
        scales += [1.0] * 2 * (MAX_BRANCHES - len(ys))
        exact = ys[0].dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
        grid = (cdiv(H * W, blocks["BLOCK_M"]) * n_blocks, B)
        _projection_kernel[grid](ys[0], *low, weight, image_bias, image_bias if bias is None else bias, out, H, W, C,
                                 cb, weight.shape[1], n_blocks, *sizes, *scales, BRANCHES=len(ys),
                                 HAS_BIAS=bias is not None,
                                 UPCAST=interpreter_mode() and ys[0].dtype == torch.bfloat16,
                                 PRECISION="ieee" if exact else "tf32", num_warps=num_warps,
                                 num_stages=num_stages, **blocks)
    return out


class _FusedProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, image_bias, bias, *ys):
        ctx.save_for_backward(weight, *ys)
        ctx.bias_dtypes = image_bias.dtype, None if bias is None else bias.dtype
        return _forward(weight, image_bias, bias, list(ys))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        weight, *ys = ctx.saved_tensors
        B, H, W, cb = ys[0].shape
        C = weight.shape[0]
        g = g.contiguous()
        image_sums = g.sum(dim=(1, 2), dtype=torch.float32) if any(ctx.needs_input_grad[1:3]) else None
        d_image_bias = image_sums.to(ctx.bias_dtypes[0]) if ctx.needs_input_grad[1] else None
        d_bias = image_sums.sum(0).to(ctx.bias_dtypes[1]) if ctx.needs_input_grad[2] else None
        d_ys, d_w = [], []
        for s, y in enumerate(ys):
            w_s = weight[:, s * cb:(s + 1) * cb]
            if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3 + s]):
                d_ys.append(None)
                continue
            if s == 0:
                g_s = g
            else:  # the upsampling's adjoint, at the branch's resolution, C channels
                g_s = torch.ops.aten.upsample_bilinear2d_backward(
                    g.permute(0, 3, 1, 2), [H, W], [B, C, *y.shape[1:3]], False, None, None).permute(0, 2, 3, 1)
            d_ys.append(g_s @ w_s if ctx.needs_input_grad[3 + s] else None)
            if ctx.needs_input_grad[0]:
                d_w.append(g_s.reshape(-1, C).t() @ y.reshape(-1, cb))
        return (torch.cat(d_w, dim=1) if d_w else None), d_image_bias, d_bias, *d_ys


def fused_output_projection(ys, weight: torch.Tensor, image_bias: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """ΔConvBlock output from its branches: image_bias[b] + bias + concat(branches upsampled to H×W) · weightᵀ.

    ys: [y_0 [B, H, W, Cb], y_1 [B, h_1, w_1, Cb], …] (1 to MAX_BRANCHES; y_0 sets the output size, the others are
    upsampled bilinearly, align_corners=False); weight: [C, len(ys)·Cb] in the branches' dtype; image_bias: [B, C];
    bias: [C] or None. Returns [B, H, W, C] in the branches' dtype (fp32 accumulation), differentiable w.r.t.
    everything.
    """
    ys = [y.contiguous() for y in ys]
    _check(ys, weight, image_bias, bias)
    weight, image_bias = weight.contiguous(), image_bias.contiguous()
    bias = None if bias is None else bias.contiguous()
    if needs_grad(weight, image_bias, bias, *ys):
        return _FusedProjection.apply(weight, image_bias, bias, *ys)
    return _forward(weight, image_bias, bias, ys)  # sampling: no autograd.Function on the host path


__all__ = ["fused_output_projection"]
