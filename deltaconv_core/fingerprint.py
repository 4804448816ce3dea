"""Which base model blocks were distilled from, told apart from the dtype the model happens to be loaded in.

One fingerprint per self-attention site, of its q (PixArt: qkv) projection weight: SAMPLES values at fixed, evenly
spaced positions, divided by the weight's RMS (so a per-tensor scale, as scaled-fp8 files store, cancels) and kept
as int8 on a grid of 1/GRID RMS, with the dtype the weight had. Written `<dtype>:<base64 of the int8 codes>`.

Loading a model in fp16, bf16 or fp8 moves each weight by at most its dtype's rounding error, and the RMS by no
more than that. Two fingerprints of one model therefore agree within that error plus the grid's rounding, sample
by sample (`tolerance`). Another model's samples are unrelated: about a quarter of them fall within it by chance.
A site matches when at least MATCH_FRACTION of its samples agree. A fine-tune whose changes are within the dtypes'
rounding matches, so under fp8 only larger changes are told apart.
"""
from __future__ import annotations

import base64

import torch

SAMPLES = 64
GRID = 32  # int8 steps per RMS: ±127 covers ±4 RMS, the rest is clamped
MATCH_FRACTION = 0.75
# Worst-case rounding of one stored weight: (relative, absolute) error. The absolute part is fp8 e4m3's subnormal
# step; weights in formats not listed here (integer-quantised, GGUF) get a coarse bound.
ROUNDING = {"float64": (0.0, 0.0), "float32": (0.0, 0.0), "float16": (2.0 ** -11, 2.0 ** -25),
            "bfloat16": (2.0 ** -9, 0.0), "float8_e4m3fn": (2.0 ** -4, 2.0 ** -10),
            "float8_e5m2": (2.0 ** -3, 2.0 ** -17)}
COARSE = (2.0 ** -2, 2.0 ** -8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rounding(name: str) -> tuple[float, float]:
    return ROUNDING.get(name, COARSE)


def _normalised_samples(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(SAMPLES values / RMS, RMS) from the weight as float32."""
    flat = weight.detach().to("cpu", torch.float32).reshape(-1)
    rms = float(flat.square().mean().sqrt())
    if not rms > 0:  # all zero, or not finite: nothing to tell a model by
        raise ValueError(f"weight RMS is {rms}")
    positions = torch.linspace(0, flat.numel() - 1, SAMPLES).round().long()
    return flat[positions] / rms, rms


def site_fingerprint(weight: torch.Tensor) -> str | None:
    """The fingerprint of one site's q (PixArt: qkv) weight, as loaded (any dtype); None for a weight without
    values to tell it by (all zero, not finite, or in a format that does not convert to float)."""
    try:
        samples, _ = _normalised_samples(weight)
    except (ValueError, TypeError, RuntimeError):
        return None
    codes = (samples * GRID).round().clamp(-127, 127).to(torch.int8)
    return f"{_dtype_name(weight.dtype)}:{base64.b64encode(codes.numpy().tobytes()).decode()}"


def _decode(fingerprint: str) -> tuple[str, torch.Tensor]:
    name, _, data = fingerprint.partition(":")
    raw = base64.b64decode(data, validate=True)
    if len(raw) != SAMPLES:
        raise ValueError(f"{len(raw)} samples, expected {SAMPLES}")
    return name, torch.frombuffer(bytearray(raw), dtype=torch.int8).float()


def tolerance(stored: torch.Tensor, current: torch.Tensor, stored_dtype: str, current_dtype: torch.dtype,
              rms: float) -> torch.Tensor:
    """Per sample, in grid steps: the most two loads of one model can differ by. The grid's rounding (½ step),
    each side's absolute rounding (relative to the RMS) and twice each side's relative rounding (once on the
    value, once more through the RMS)."""
    rel_a, abs_a = _rounding(stored_dtype)
    rel_b, abs_b = _rounding(_dtype_name(current_dtype))
    return 1.0 + GRID * (abs_a + abs_b) / rms + 2 * (rel_a + rel_b) * torch.maximum(stored.abs(), current.abs())


def same_base(fingerprint: str, weight: torch.Tensor) -> bool | None:
    """Whether `weight` is the weight the fingerprint was taken from, in any dtype; None when either cannot be
    read (a damaged fingerprint, a weight without values to compare)."""
    try:
        stored_dtype, stored = _decode(fingerprint)
        samples, rms = _normalised_samples(weight)
    except (ValueError, TypeError, RuntimeError):
        return None
    current = (samples * GRID).clamp(-127, 127)
    agree = (stored - current).abs() <= tolerance(stored, current, stored_dtype, weight.dtype, rms)
    return float(agree.float().mean()) >= MATCH_FRACTION


def mismatched_sites(fingerprints: dict[str, str], weights: dict[str, torch.Tensor]) -> tuple[list[str], int]:
    """(sites whose weight is not the fingerprinted one, how many sites were compared): on the sites both have."""
    verdicts = {name: same_base(fingerprints[name], w) for name, w in weights.items() if name in fingerprints}
    compared = [name for name, same in verdicts.items() if same is not None]
    return [name for name in compared if not verdicts[name]], len(compared)
