"""Launch arithmetic and checks shared by the kernels' host code: plain integers and per-device facts read once. The
host path runs once per block per sampling step, so it avoids triton.cdiv / next_power_of_2 (constexpr functions in
Triton 3.8, ~5 µs a call from Python) and repeated device queries."""
from __future__ import annotations

import functools

import torch


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on `tensors` (None entries ignored): the autograd.Function path, else the
    plain launch (sampling)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    """The CUDA compute capability; ROCm counts as (9, 0) (its Triton takes the Ampere+ configurations)."""
    return (9, 0) if torch.version.hip else torch.cuda.get_device_capability(device_index)
