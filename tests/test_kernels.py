"""Fused Triton dwconv+gate kernel (deltaconv_core/kernels/dwconv_gate.py) against float64 references, forward and
backward, plus the kernel routing. Pooling inside the kernel, the fused output projection and the whole block on
the kernels: test_kernels_fused.py.

Without a GPU the kernels run in Triton's CPU interpreter (see scripts/devkit/triton_interpreter.py); \
with CUDA the same tests run
compiled on the GPU. Sizes are tiny: the interpreter runs every program as Python.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from devkit.triton_interpreter import DEVICE, import_kernels, interpreter, kernels

if not kernels.triton_available():
    pytest.skip("triton is not installed", allow_module_level=True)
(dwconv_gate,) = import_kernels("dwconv_gate")


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_this_module_runs():
    with interpreter():
        yield


TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the largest |reference|


def torch_dwconv_gate(v, weight, bias, gate, const):
    """Plain torch version (run in float64): NCHW grouped conv with explicit zero padding, then the gate."""
    c, k = v.shape[-1], weight.shape[0]
    x = F.pad(v.permute(0, 3, 1, 2), [k // 2] * 4)
    out = F.conv2d(x, weight.permute(2, 0, 1).unsqueeze(1), bias, groups=c)
    a, b = out[:, : c // 2], out[:, c // 2:]
    y = a * b * const if gate == "scaled" else a / (1 + torch.exp(-b))
    return y.permute(0, 2, 3, 1)


def assert_close_rel(actual, expected, tol, what=""):
    scale = expected.abs().max().item() or 1.0
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} × max|ref| {scale:.3e}"


def check_against_float64(batch, hw, c, k, gate, with_bias, seed, dtype=torch.float32, grads=(True, True, True)):
    """Kernel in `dtype` vs float64 torch on the same (rounded) inputs: output and every requested gradient."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, *hw, c, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(k, k, c, generator=gen, dtype=torch.float64) / k).to(dtype)
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None
    const = (c / 2) ** 0.5
    leaves64 = [t.double().requires_grad_(g) if t is not None else None for t, g in zip((v, w, b), grads)]
    leaves = [t.to(DEVICE).requires_grad_(g) if t is not None else None for t, g in zip((v, w, b), grads)]
    ref = torch_dwconv_gate(*leaves64, gate, const)
    out = dwconv_gate.fused_dwconv_gate(*leaves, gate, const)
    assert out.shape == (batch, *hw, c // 2) and out.dtype == dtype and out.device.type == DEVICE
    tol = TOL[dtype]
    assert_close_rel(out, ref, tol, "forward")
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    ref.backward(gy.double())
    out.backward(gy.to(DEVICE))
    for name, t64, t in zip(("v", "weight", "bias"), leaves64, leaves):
        if t is None or not t.requires_grad:
            continue
        assert t.grad.dtype == dtype
        assert_close_rel(t.grad, t64.grad, tol, f"grad {name}")


# Every size × kernel size once, the gate and bias cycling so each (gate, bias) pair meets several sizes and k.
SIZES = [(7, 5), (9, 13), (1, 3), (16, 16)]
CASES = [pytest.param(hw, k, ("scaled", "sigmoid")[i % 2], i % 4 >= 2, 100 + i, id=f"{hw[0]}x{hw[1]}-k{k}-{i}")
         for i, (hw, k) in enumerate(itertools.product(SIZES, (1, 3, 7)))]


@pytest.mark.parametrize("hw,k,gate,with_bias,seed", CASES)
def test_fp32_matches_float64(hw, k, gate, with_bias, seed):
    check_against_float64(1 if k == 7 else 2, hw, 8, k, gate, with_bias, seed)  # batch 2 where it is cheap


@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_both_gates_with_and_without_bias(gate, with_bias):
    check_against_float64(1, (5, 6), 12, 3, gate, with_bias, seed=7 + 2 * with_bias + (gate == "sigmoid"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
def test_half_precision(dtype, gate):
    if DEVICE == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    check_against_float64(2, (6, 7), 8, 3, gate, True, seed=31 + (gate == "sigmoid"), dtype=dtype)


@pytest.mark.parametrize("hw,c", [((7, 5), 12), ((5, 9), 10)])
def test_many_small_tiles(monkeypatch, hw, c):
    """Tiles much smaller than the image and a channel block that does not divide C/2: tile seams and tails."""
    monkeypatch.setattr(dwconv_gate, "BLOCK_OVERRIDE", dict(TILE_H=4, TILE_W=4, BLOCK_C=4))
    check_against_float64(1, hw, c, 3, "scaled" if c == 12 else "sigmoid", True, seed=sum(hw) + c)


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True)])
def test_partial_gradients_and_non_contiguous_input(grads):
    check_against_float64(1, (4, 5), 8, 3, "sigmoid", True, seed=5, grads=grads)
    base = torch.randn(1, 4, 5, 16, device=DEVICE)
    v = base[..., 4:12]  # channel slice: not contiguous
    w = torch.randn(3, 3, 8, device=DEVICE)
    ref = torch_dwconv_gate(v.double(), w.double(), None, "scaled", 2.0)
    assert_close_rel(dwconv_gate.fused_dwconv_gate(v, w, None, "scaled", 2.0), ref, 1e-4, "non-contiguous")


def test_bad_arguments_and_empty_batch():
    v, w = torch.randn(1, 3, 3, 8, device=DEVICE), torch.randn(3, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="gate"):
        dwconv_gate.fused_dwconv_gate(v, w, None, "relu", 1.0)
    with pytest.raises(ValueError, match="even C"):
        dwconv_gate.fused_dwconv_gate(torch.randn(1, 3, 3, 7, device=DEVICE), w[..., :7], None, "scaled", 1.0)
    with pytest.raises(ValueError, match="odd k"):
        dwconv_gate.fused_dwconv_gate(v, torch.randn(2, 2, 8, device=DEVICE), None, "scaled", 1.0)
    with pytest.raises(ValueError, match="bias"):
        dwconv_gate.fused_dwconv_gate(v, w, torch.randn(4, device=DEVICE), "scaled", 1.0)
    empty = torch.randn(0, 3, 3, 8, device=DEVICE, requires_grad=True)
    out = dwconv_gate.fused_dwconv_gate(empty, w, None, "scaled", 1.0)
    assert out.shape == (0, 3, 3, 4)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


# ------------------------------------------------------------------------------------------ the weight gradient
def reference_weight_grad(v, dvc, k):
    """float64, one tap at a time: dw[i, j, c] = Σ_{b,y,x} dvc[b,y,x,c] · v[b, y+i-k//2, x+j-k//2, c], zero outside."""
    H, W, p = v.shape[1], v.shape[2], k // 2
    padded = F.pad(v.double(), (0, 0, p, p, p, p))
    return torch.stack([torch.stack([(dvc.double() * padded[:, i:i + H, j:j + W]).sum((0, 1, 2)) for j in range(k)])
                        for i in range(k)])


def nan_fenced(t):
    """t in storage with NaNs before and after it: a read past either end (a missing mask) poisons the sums."""
    storage = torch.full((t.numel() + 512,), float("nan"), dtype=t.dtype, device=t.device)
    storage[256:256 + t.numel()] = t.flatten()
    return storage[256:256 + t.numel()].view(t.shape)


# (batch, size, channels, k, sms): sms = 0 plans one band (the interpreter's plan), sms > 0 plans as for a GPU of that
# many SMs: bands of 1–3 rows, some across an image border (odd H), tails of a channel block (20 of 32, 8 of 16) and
# several channel blocks (48 = 3 × 16); a 1-pixel-high image, k = 1, and taps reaching past both borders (k = 13 on
# 4×6, k = 9 on 3 columns).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,hw,c,k,sms", [
    (2, (7, 5), 12, 3, 0), (3, (5, 9), 20, 5, 2), (1, (9, 13), 8, 7, 1), (2, (1, 6), 16, 3, 4), (2, (3, 4), 8, 1, 0),
    (1, (4, 6), 24, 13, 3), (1, (5, 3), 16, 9, 2), (1, (6, 7), 48, 3, 2),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_weight_grad_matches_float64(dtype, batch, hw, c, k, sms):
    """The weight-gradient kernel on its own, on fresh random v (in `dtype`) and dvc (fp32, as the gate kernel writes
    it), against float64: only fp32 accumulation differs. Two runs agree bit for bit (no atomics)."""
    gen = torch.Generator().manual_seed(sum(hw) * 10 + c + k)
    v = torch.randn(batch, *hw, c, generator=gen).to(dtype)
    dvc = torch.randn(batch, *hw, c, generator=gen)
    args = nan_fenced(v.to(DEVICE)), nan_fenced(dvc.to(DEVICE)), k, sms
    dw = dwconv_gate._weight_grad(*args)
    assert dw.shape == (k, k, c) and dw.dtype == torch.float32
    assert_close_rel(dw, reference_weight_grad(v, dvc, k), 1e-5, "weight gradient")
    assert torch.equal(dw, dwconv_gate._weight_grad(*args)), "not reproducible"


# ------------------------------------------------------------------------------------------------ routing / import
def test_use_triton_routing(monkeypatch):
    monkeypatch.delenv("DELTACONV_TRITON", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu32 = torch.zeros(1)
    assert not kernels.use_triton(cpu32), "CPU tensors only go to the kernel under the interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(cpu32)
    assert not kernels.use_triton(cpu32.double()), "no float64 kernel"
    monkeypatch.setenv("DELTACONV_TRITON", "0")
    assert not kernels.use_triton(cpu32)
    monkeypatch.delenv("DELTACONV_TRITON")
    kernels.set_enabled(False)
    try:
        assert not kernels.use_triton(cpu32)
    finally:
        kernels.set_enabled(None)
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        assert kernels.use_triton(torch.zeros(1, device="cuda"))


def test_package_imports_without_triton():
    """`deltaconv_core.kernels` must import, and say no, on a machine without triton."""
    code = ("import sys\n"
            "sys.modules['triton'] = None  # what find_spec and import see when triton is not installed\n"
            "import torch, deltaconv_core.kernels as k\n"
            "assert not k.triton_available() and not k.use_triton(torch.zeros(1))\n"
            "assert not k.use_triton(torch.zeros(1, device='cuda') if torch.cuda.is_available() else torch.zeros(1))\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
