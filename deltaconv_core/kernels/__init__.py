"""Optional fused Triton kernels for the ΔConvBlock: everything after conv_up.

This package imports without triton. The kernel modules (`dwconv_gate`: [pooling +] depthwise conv + gate of one
pyramid scale; `output_projection`: bilinear upsampling of the pooled scales + concatenation + conv_out + the
per-image pooled bias) import triton and are loaded lazily on first use. Triton's CPU interpreter (used by the
tests) needs TRITON_INTERPRET=1 both when those modules are first imported (their @triton.jit decorators pick
interpreted or compiled then) and while the kernels run.

Usage from the block (u: conv_up's output [B, H, W, C_i], channel-last):

    from deltaconv_core import kernels
    if kernels.use_triton(u):
        out = kernels.delta_conv_or_none(u, gates, gate, gate_constant, weight, image_bias, bias)  # [B, H, W, C]
        if out is not None: return out
    ... torch path ...

Switch: set DELTACONV_TRITON=0 in the environment, or call `set_enabled(False)`, to always use the torch path.
The first failure of the kernel path (say triton installed without a working C compiler for its launcher) turns it
off for the rest of the process with one warning; `failure()` then says why. Backward kernels are compiled and
launched once, on a one-image copy, the first time a configuration runs with gradients: a backward that cannot
run then falls back like a forward does, instead of failing later inside `loss.backward()`.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

_enabled: bool | None = None  # None: follow the DELTACONV_TRITON environment variable
_failure: str | None = None  # why the kernel path switched itself off, if it did
_backward_checked: set = set()  # configurations whose backward kernels have run once in this process
MAX_BRANCHES = 4  # pyramid scales the fused output projection takes (its pointer arguments); more go to torch


@functools.cache
def triton_available() -> bool:
    """True when triton is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreter_mode() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1), which also runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def set_enabled(enabled: bool | None) -> None:
    """Force the kernels on (still only where usable) or off; None goes back to the DELTACONV_TRITON variable."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("DELTACONV_TRITON", "1").lower() not in ("0", "false", "off", "no")


@functools.cache
def _cuda_capability_ok(device_index: int, needs_bf16: bool) -> bool:
    import torch

    if torch.version.hip is not None:  # ROCm: triton supports the GPUs torch supports
        return True
    major, minor = torch.cuda.get_device_capability(device_index)
    return (major, minor) >= ((8, 0) if needs_bf16 else (7, 0))


def use_triton(t) -> bool:
    """Whether the fused kernels should handle tensor `t` (the gate input u, any 4-D layout): enabled, triton
    installed, fp32/fp16/bf16, and either a CUDA tensor on a GPU triton supports or Triton's interpreter switched on
    (then CPU tensors work too, slowly: tests only)."""
    import torch

    if not enabled() or not triton_available() or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if t.dim() == 4 and t[:1].numel() >= 2**31:  # one image past the kernel's int32 offsets
        return False
    if t.is_cuda:
        return interpreter_mode() or _cuda_capability_ok(t.device.index or 0, t.dtype == torch.bfloat16)
    return interpreter_mode() and t.device.type == "cpu"


def fused_dwconv_gate(v, weight, bias, gate: str, gate_constant: float, pool_to=None):
    """[Adaptive average pooling to pool_to +] depthwise k×k conv (+bias) and gate of one pyramid scale, fused:
    v [B,H,W,C_i] → y [B,h,w,C_i/2]. See `dwconv_gate.fused_dwconv_gate`."""
    from .dwconv_gate import fused_dwconv_gate as impl

    return impl(v, weight, bias, gate, gate_constant, pool_to)


def fused_output_projection(ys, weight, image_bias, bias=None):
    """image_bias[b] + bias + concat(branches, the pooled ones upsampled bilinearly to y_0's H×W) · weightᵀ →
    [B,H,W,C]. See `output_projection.fused_output_projection`."""
    from .output_projection import fused_output_projection as impl

    return impl(ys, weight, image_bias, bias)


def delta_conv_triton(u, gates, gate: str, gate_constant: float, weight, image_bias, bias=None):
    """The ΔConvBlock after conv_up, all in Triton: u [B,H,W,C_i] → [B,H,W,C].

    gates: one (weight [k,k,C_i], bias [C_i] or None, pooled size (h, w) or None) per pyramid scale, the first at
    full resolution; weight: conv_out's [C, n·C_i/2]; image_bias [B, C]: conv_pool(mean x); bias: conv_out's [C].
    The pooled scales stay at their own resolution until the projection reads them. In sampling the ½ scale's
    input, for even H and W, comes from the full-resolution launch (`fused_dwconv_gate_and_pool`), not a pooling
    pass."""
    from .dwconv_gate import fused_dwconv_gate_and_pool
    from .launch import needs_grad

    (w0, b0, _), *pooled_gates = gates
    half = (u.shape[1] // 2, u.shape[2] // 2)
    halved = None
    if any(pool_to == half for *_, pool_to in pooled_gates) and not needs_grad(u, w0, b0):
        y0, halved = fused_dwconv_gate_and_pool(u, w0, b0, gate, gate_constant)
    else:
        y0 = fused_dwconv_gate(u, w0, b0, gate, gate_constant)
    ys = [y0]
    for w, b, pool_to in pooled_gates:
        source = (halved, None) if halved is not None and pool_to == half else (u, pool_to)
        ys.append(fused_dwconv_gate(source[0], w, b, gate, gate_constant, source[1]))
    return fused_output_projection(ys, weight, image_bias, bias)


def failure() -> str | None:
    """Why the kernel path switched itself off after an error, or None."""
    return _failure


def _check_backward(u, gates, gate: str, gate_constant: float, weight, image_bias, bias):
    """Forward and backward of the kernels once per configuration, on detached one-image copies (the kernels'
    code depends on dtypes, bias, gate, pooling and sizes, not on the batch)."""
    key = (u.device, u.dtype, tuple(u.shape[1:]), gate, weight.dtype, bias is None,
           tuple((tuple(w.shape), b is None, pool_to) for w, b, pool_to in gates))
    if key in _backward_checked:
        return

    def leaf(t, one_image=False):
        return None if t is None else (t[:1] if one_image else t).detach().clone().requires_grad_(True)

    probe = delta_conv_triton(leaf(u, True), [(leaf(w), leaf(b), pool_to) for w, b, pool_to in gates], gate,
                              gate_constant, leaf(weight), leaf(image_bias, True), leaf(bias))
    probe.float().sum().backward()
    _backward_checked.add(key)


def delta_conv_or_none(u, gates, gate: str, gate_constant: float, weight, image_bias, bias=None):
    """`delta_conv_triton` for the block: None (use the torch path) when the kernels are off or unusable for u or
    for this many scales, or when this call failed; a failure switches the kernel path off for the process, with
    one warning, rather than failing a whole generation or training run. Out-of-memory errors are raised as they
    are."""
    global _failure
    if _failure is not None or not use_triton(u) or len(gates) > MAX_BRANCHES:
        return None
    import torch

    from .launch import needs_grad

    try:
        if needs_grad(u, weight, image_bias, bias, *(t for w, b, _ in gates for t in (w, b))):
            _check_backward(u, gates, gate, gate_constant, weight, image_bias, bias)
        return delta_conv_triton(u, gates, gate, gate_constant, weight, image_bias, bias)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in newer torch is the same class
        raise
    except Exception as e:  # compiler, driver and toolchain errors come in many types
        _failure = f"{type(e).__name__}: {e}"
        logging.getLogger(__name__).warning("ΔConv: Triton kernels switched off, using PyTorch ops (%s)", _failure)
        return None


__all__ = ["MAX_BRANCHES", "delta_conv_or_none", "delta_conv_triton", "enabled", "failure", "fused_dwconv_gate",
           "fused_output_projection", "interpreter_mode", "set_enabled", "triton_available", "use_triton"]
