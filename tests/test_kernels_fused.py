"""Fused ΔConv kernels beyond the plain dwconv+gate: adaptive pooling inside the dwconv+gate kernel, the fused output
projection (bilinear upsampling + concatenation + conv_out + per-image bias), and the whole block routed through
them, forward and backward, against float64 references (deltaconv_core/reference.py and plain torch).

Without a GPU the kernels run in Triton's CPU interpreter (scripts/devkit/triton_interpreter.py); with CUDA the
same tests run compiled on the GPU. Sizes are tiny: the interpreter runs every program as Python.
test_kernels_compile.py compiles every configuration for GPU targets, which the interpreter cannot check.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from deltaconv_core.block import BlockConfig
from deltaconv_core.reference import reference_adaptive_avg_pool, reference_bilinear_resize, reference_block_forward
from deltaconv_core.students import build_student
from devkit.triton_interpreter import DEVICE, import_kernels, interpreter, kernels

if not kernels.triton_available():
    pytest.skip("triton is not installed", allow_module_level=True)
dwconv_gate, projection = import_kernels("dwconv_gate", "output_projection")


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_this_module_runs():
    with interpreter():
        yield


TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the largest |reference|


def assert_close_rel(actual, expected, tol, what=""):
    scale = expected.abs().max().item() or 1.0
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} × max|ref| {scale:.3e}"


def nan_guarded(t):
    """t's values in contiguous storage followed by NaNs: a load past its end (a missing tail mask) poisons the
    result even where the value read would be multiplied by a masked zero."""
    storage = torch.full((t.numel() + 256,), float("nan"), dtype=t.dtype, device=t.device)
    storage[:t.numel()] = t.flatten()
    return storage[:t.numel()].view(t.shape)


def leaves(tensors, dtype, device, guard=False):
    """(float64 copies, copies in dtype on device), all requiring grad; the same rounded values in both."""
    rounded = [t.to(dtype) for t in tensors]
    on_device = [nan_guarded(t.to(device)) if guard else t.to(device) for t in rounded]
    return [t.double().requires_grad_() for t in rounded], [t.requires_grad_() for t in on_device]


def check_grads(out, ref, inputs, inputs64, gen, tol):
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    ref.backward(gy.double())
    out.backward(gy.to(out.device))
    for i, (t, t64) in enumerate(zip(inputs, inputs64)):
        assert t.grad is not None and t.grad.dtype == t.dtype, f"grad {i}"
        assert_close_rel(t.grad, t64.grad, tol, f"grad {i}")


# ------------------------------------------------------------------------------- pooling inside the dwconv+gate
def reference_pooled_scale(u, weight, bias, gate, const, pool_to):
    """float64: reference.py's explicit-window pooling, zero-padded grouped conv, gate; [B,H,W,C] → [B,h,w,C/2]."""
    v = reference_adaptive_avg_pool(u.permute(0, 3, 1, 2), pool_to)
    c, k = v.shape[1], weight.shape[0]
    out = F.conv2d(F.pad(v, [k // 2] * 4), weight.permute(2, 0, 1).unsqueeze(1), bias, groups=c)
    a, b = out[:, : c // 2], out[:, c // 2:]
    y = a * b * const if gate == "scaled" else a / (1 + torch.exp(-b))
    return y.permute(0, 2, 3, 1)


def check_pooled(hw, pool_to, c, k, gate, with_bias, seed, dtype=torch.float32, batch=1):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, *hw, c, generator=gen, dtype=torch.float64),
               torch.randn(k, k, c, generator=gen, dtype=torch.float64) / k]
    if with_bias:
        tensors.append(torch.randn(c, generator=gen, dtype=torch.float64))
    t64, t = leaves(tensors, dtype, DEVICE)
    const = (c / 2) ** 0.5
    ref = reference_pooled_scale(*t64, *([None] if not with_bias else []), gate, const, pool_to)
    out = dwconv_gate.fused_dwconv_gate(*t, *([None] if not with_bias else []), gate, const, pool_to=pool_to)
    assert out.shape == (batch, *pool_to, c // 2) and out.dtype == dtype
    assert_close_rel(out, ref, TOL[dtype], "forward")
    check_grads(out, ref, t, t64, gen, TOL[dtype])


# (input size, pooled size): scale ½ of odd and non-square grids (windows of 3 and 2), a 1-pixel-high grid,
# pooled sizes that are no scale of the input (windows of different sizes in one row or column), and "pooling" to
# a larger grid (overlapping windows).
@pytest.mark.parametrize("hw,pool_to,k,gate,with_bias,seed", [
    ((7, 5), (3, 2), 3, "scaled", True, 21),
    ((9, 12), (4, 6), 3, "sigmoid", False, 22),
    ((1, 6), (1, 3), 3, "sigmoid", True, 23),
    ((9, 12), (2, 3), 1, "scaled", False, 24),
    ((7, 5), (2, 3), 3, "scaled", False, 25),
    ((3, 2), (4, 3), 1, "sigmoid", True, 26),
])
def test_pooled_dwconv_gate_matches_float64(hw, pool_to, k, gate, with_bias, seed):
    check_pooled(hw, pool_to, 8, k, gate, with_bias, seed, batch=2 if k == 1 else 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooled_half_precision(dtype):
    if DEVICE == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    check_pooled((7, 9), (5, 4), 8, 3, "sigmoid" if dtype == torch.float16 else "scaled", True, seed=41, dtype=dtype)


def test_pooled_many_small_tiles(monkeypatch):
    """Tiles smaller than the pooled grid and a channel block that does not divide C/2: seams and tails."""
    monkeypatch.setattr(dwconv_gate, "BLOCK_OVERRIDE", dict(TILE_H=4, TILE_W=2, BLOCK_C=4))
    check_pooled((7, 5), (5, 2), 12, 3, "scaled", True, seed=43)


# ------------------------------------------------------------------------------------- fused output projection
def reference_projection(ys, weight, image_bias, bias=None):
    """float64: reference.py's explicit bilinear taps, an explicit concatenation, a plain matmul."""
    H, W = ys[0].shape[1:3]
    up = [ys[0]] + [reference_bilinear_resize(y.permute(0, 3, 1, 2), (H, W)).permute(0, 2, 3, 1) for y in ys[1:]]
    out = torch.cat(up, dim=-1) @ weight.t() + image_bias[:, None, None, :]
    return out if bias is None else out + bias


def check_projection(hw, low_sizes, cb, c, seed, dtype=torch.float32, batch=2, grads=None, guard=False, bias=True):
    """grads: requires_grad of (weight, image_bias, bias, branches...); bias=False passes None for conv_out's."""
    gen = torch.Generator().manual_seed(seed)
    ys = [torch.randn(batch, *size, cb, generator=gen, dtype=torch.float64) for size in [hw, *low_sizes]]
    weight = torch.randn(c, len(ys) * cb, generator=gen, dtype=torch.float64) / cb ** 0.5
    image_bias = torch.randn(batch, c, generator=gen, dtype=torch.float64)
    out_bias = torch.randn(c, generator=gen, dtype=torch.float64)
    t64, t = leaves([weight, image_bias, out_bias, *ys], dtype, DEVICE, guard)
    if grads is not None:
        for a, b, g in zip(t, t64, grads):
            a.requires_grad_(g), b.requires_grad_(g)
    if not bias:
        t64[2] = t[2] = None
    ref = reference_projection(t64[3:], t64[0], t64[1], t64[2])
    out = projection.fused_output_projection(t[3:], t[0], t[1], t[2])
    assert out.shape == (batch, *hw, c) and out.dtype == dtype
    assert_close_rel(out, ref, TOL[dtype], "forward")
    needed = [i for i, a in enumerate(t) if a is not None and a.requires_grad]
    check_grads(out, ref, [t[i] for i in needed], [t64[i] for i in needed], gen, TOL[dtype])
    assert all(a.grad is None for a in t if a is not None and not a.requires_grad)


def scale_sizes(hw, scales):
    return [(max(1, int(hw[0] * s)), max(1, int(hw[1] * s))) for s in scales]


# Branch counts 1-4, odd and non-square grids, 1-pixel-high/-wide ones, and low-res sizes that are no scale of H×W.
@pytest.mark.parametrize("hw,low_sizes", [
    ((5, 7), []),
    ((7, 5), scale_sizes((7, 5), (0.5,))),
    ((9, 12), scale_sizes((9, 12), (0.5, 0.25))),
    ((1, 6), scale_sizes((1, 6), (0.5,))),
    ((6, 1), scale_sizes((6, 1), (0.5, 0.25))),
    ((7, 5), [(2, 3), (1, 1), (5, 2)]),
    ((2, 3), [(3, 4)]),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ",".join("x".join(map(str, s)) for s in v))
def test_projection_matches_float64(hw, low_sizes):
    check_projection(hw, low_sizes, 6, 24, seed=sum(hw) * 7 + len(low_sizes), bias=len(low_sizes) != 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_half_precision(dtype):
    if DEVICE == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    check_projection((7, 9), scale_sizes((7, 9), (0.5, 0.25)), 20, 24, seed=51, dtype=dtype)


def test_projection_many_small_tiles(monkeypatch):
    """16-wide blocks (tl.dot's minimum) on 35 pixels, 40 output and 20 branch channels: every dimension has a
    partial block, and the output-channel blocks of one pixel tile sit side by side. Inputs are followed by NaNs
    in memory, so a tail read past any of them shows."""
    monkeypatch.setattr(projection, "BLOCK_OVERRIDE", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
    check_projection((7, 5), scale_sizes((7, 5), (0.5, 0.25)), 20, 40, seed=53, guard=True)


@pytest.mark.parametrize("grads", [(False, True, False, True, False), (True, False, True, False, True)])
def test_projection_partial_gradients(grads):
    check_projection((5, 6), scale_sizes((5, 6), (0.5,)), 6, 16, seed=55, grads=grads)


def test_projection_bad_arguments():
    y0, y1 = torch.randn(1, 4, 4, 6, device=DEVICE), torch.randn(1, 2, 2, 6, device=DEVICE)
    w, b = torch.randn(8, 12, device=DEVICE), torch.randn(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="branches"):
        projection.fused_output_projection([y0] * (kernels.MAX_BRANCHES + 1), w, b)
    with pytest.raises(ValueError, match="one B and Cb"):
        projection.fused_output_projection([y0, y1[..., :4]], w, b)
    with pytest.raises(ValueError, match="weight"):
        projection.fused_output_projection([y0, y1], w[:, :6], b)
    with pytest.raises(ValueError, match="image_bias"):
        projection.fused_output_projection([y0, y1], w, b[:, :4])
    with pytest.raises(ValueError, match="dtype"):
        projection.fused_output_projection([y0, y1], w.double(), b)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        projection.fused_output_projection([y0, y1], w, b, b)


# ------------------------------------------------------------------------------------- the block on the kernels
def random_block(cfg, gen):
    block = build_student(cfg, dtype=torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return block


@contextlib.contextmanager
def counting_kernel_calls():
    """Counts the fused kernels' forward launches, with or without autograd: {"dwconv": n, "projection": n}."""
    calls = {"dwconv": 0, "projection": 0}
    with pytest.MonkeyPatch.context() as mp:
        for key, module in (("dwconv", dwconv_gate), ("projection", projection)):
            def counted(*args, _key=key, _real=module._forward, **kwargs):
                calls[_key] += 1
                return _real(*args, **kwargs)

            mp.setattr(module, "_forward", counted)
        yield calls


def check_block(cfg, hw, seed, dtype=torch.float32, tol=1e-4, batch=2):
    """The block routed through the kernels in `dtype`: output vs reference.py, gradients of the input and of every
    parameter vs the block's torch path, both in float64 on the same (rounded) parameters and input."""
    gen = torch.Generator().manual_seed(seed)
    block64 = random_block(cfg, gen).to(dtype).double()
    x64 = torch.randn(batch, *hw, cfg.dim, generator=gen, dtype=torch.float64).to(dtype).double().requires_grad_()
    ref = block64(x64)  # float64: the torch path (no float64 kernel)
    assert_close_rel(ref, reference_block_forward(block64.state_dict(), cfg, x64), 1e-12, "torch path")

    block = build_student(cfg, state_dict=block64.state_dict(), device=DEVICE, dtype=dtype)
    x = x64.detach().to(device=DEVICE, dtype=dtype).requires_grad_()
    block(x)  # the first call with gradients also runs the backward kernels once, on a copy
    with counting_kernel_calls() as calls:
        out = block(x)
    assert calls == {"dwconv": len(cfg.scales), "projection": 1} and kernels.failure() is None, kernels.failure()
    assert out.dtype == dtype
    assert_close_rel(out, ref, tol, "block forward")
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(gy)
    out.backward(gy.to(device=DEVICE, dtype=dtype))
    assert_close_rel(x.grad, x64.grad, tol, "grad x")
    params64 = dict(block64.named_parameters())
    for name, p in block.named_parameters():
        assert p.grad.dtype == dtype
        assert_close_rel(p.grad, params64[name].grad, tol, f"grad {name}")


@pytest.mark.parametrize("gate,scales,dw_bias,hw,k,seed", [
    ("scaled", (1.0,), False, (7, 5), 5, 31),
    ("sigmoid", (1.0, 0.5), True, (9, 12), 3, 32),
    ("scaled", (1.0, 0.5, 0.25), False, (1, 8), 3, 33),
])
def test_block_on_kernels_matches_float64(gate, scales, dw_bias, hw, k, seed):
    check_block(BlockConfig(dim=16, kernel_size=k, scales=scales, gate=gate, dw_bias=dw_bias), hw, seed)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_block_on_kernels_half_precision(dtype, tol):
    if DEVICE == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    check_block(BlockConfig(dim=16, kernel_size=3, scales=(1.0, 0.5), gate="scaled", dw_bias=True), (7, 6), 61,
                dtype, tol, batch=1)


def test_block_on_kernels_under_autocast():
    """Distillation's setting: fp32 parameters and input, bf16 autocast. The kernels run in the autocast dtype
    (conv_up's output), like the torch path's matmuls; output and fp32 parameter gradients match that path."""
    cfg = BlockConfig(dim=16, kernel_size=3, scales=(1.0, 0.5), gate="sigmoid")
    gen = torch.Generator().manual_seed(65)
    block = random_block(cfg, gen).to(device=DEVICE, dtype=torch.float32)
    x = torch.randn(2, 5, 7, cfg.dim, generator=gen).to(DEVICE)
    results = []
    for use_kernels in (True, False):
        kernels.set_enabled(use_kernels)
        block.zero_grad()
        try:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                block(x)  # the first call with gradients also runs the backward kernels once, on a copy
            with counting_kernel_calls() as calls, torch.autocast(DEVICE, dtype=torch.bfloat16):
                out = block(x)
            out.float().square().mean().backward()
        finally:
            kernels.set_enabled(None)
        assert calls["projection"] == int(use_kernels) and out.dtype == torch.bfloat16
        results.append((out, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (out, grads), (out_torch, grads_torch) = results
    assert_close_rel(out, out_torch, 3e-2, "output")
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert_close_rel(g, grads_torch[name], 6e-2, f"grad {name}")


@pytest.mark.parametrize("hw,tiles", [((6, 12), None), ((6, 12), dict(TILE_H=2, TILE_W=4, BLOCK_C=4)),
                                      ((10, 6), dict(TILE_H=4, TILE_W=4, BLOCK_C=4))])
def test_sampling_pools_in_the_full_resolution_launch(monkeypatch, hw, tiles):
    """Without gradients, for even H and W, the full-resolution launch writes u pooled 2×2 (exactly
    adaptive_avg_pool2d to (H/2, W/2)) beside its output, in tiles with seams, partial tiles and channel tails."""
    if tiles:
        monkeypatch.setattr(dwconv_gate, "BLOCK_OVERRIDE", tiles)
    gen = torch.Generator().manual_seed(sum(hw))
    u = torch.randn(2, *hw, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 3, 12, generator=gen, dtype=torch.float64) / 3
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    y, pooled = dwconv_gate.fused_dwconv_gate_and_pool(u.float().to(DEVICE), w.float().to(DEVICE),
                                                       b.float().to(DEVICE), "scaled", 2.0)
    half = (hw[0] // 2, hw[1] // 2)
    assert pooled.shape == (2, *half, 12) and pooled.dtype == torch.float32
    assert_close_rel(pooled, reference_adaptive_avg_pool(u.permute(0, 3, 1, 2), half).permute(0, 2, 3, 1), 1e-6,
                     "pooled")
    assert_close_rel(y, reference_pooled_scale(u, w, b, "scaled", 2.0, hw), 1e-5, "full-resolution output")


def test_sampling_pools_with_torch_where_the_launch_cannot():
    """Odd sides, and tiles one pixel high: no side output (the block pools with torch then)."""
    u, w = torch.randn(1, 7, 6, 8, device=DEVICE), torch.randn(3, 3, 8, device=DEVICE)
    assert dwconv_gate.fused_dwconv_gate_and_pool(u, w, None, "sigmoid", 1.0)[1] is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dwconv_gate, "BLOCK_OVERRIDE", dict(TILE_H=1, TILE_W=4, BLOCK_C=4))
        assert dwconv_gate.fused_dwconv_gate_and_pool(u[:, :6], w, None, "sigmoid", 1.0)[1] is None


@pytest.mark.parametrize("scales,hw", [((1.0, 0.5), (6, 8)), ((1.0, 0.5, 0.25), (8, 12)), ((1.0, 0.5), (7, 6))])
def test_block_sampling_on_kernels_matches_float64(monkeypatch, scales, hw):
    """A block in sampling (no gradients), where the ½ scale's input comes from the full-resolution launch (even
    sides: torch pools only the other scales) or from torch (odd), against reference.py in float64."""
    cfg = BlockConfig(dim=16, kernel_size=3, scales=scales, gate="sigmoid", dw_bias=True)
    block64 = random_block(cfg, torch.Generator().manual_seed(sum(hw) + len(scales)))
    x64 = torch.randn(2, *hw, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    block = build_student(cfg, state_dict=block64.state_dict(), device=DEVICE, dtype=torch.float32)
    pools = []
    real_pool = F.adaptive_avg_pool2d
    monkeypatch.setattr(F, "adaptive_avg_pool2d", lambda t, size: pools.append(tuple(size)) or real_pool(t, size))
    with counting_kernel_calls() as calls, torch.no_grad():
        out = block(x64.float().to(DEVICE))
    assert calls == {"dwconv": len(scales), "projection": 1} and kernels.failure() is None
    even = hw[0] % 2 == hw[1] % 2 == 0
    assert pools == [tuple(int(n * s) for n in hw) for s in scales[1:] if not even or s != 0.5]
    assert_close_rel(out, reference_block_forward(block64.state_dict(), cfg, x64), 1e-5, "sampling forward")


def test_block_routing(monkeypatch):
    """The block takes the kernels by itself; set_enabled(False) / DELTACONV_TRITON=0 keep it on torch; more scales
    than the projection takes go to torch without counting as a failure."""
    gen = torch.Generator().manual_seed(71)
    cfg = BlockConfig(dim=8, kernel_size=3, scales=(1.0, 0.5), gate="sigmoid", dw_bias=True)
    block = random_block(cfg, gen).to(device=DEVICE, dtype=torch.float32)
    x = torch.randn(1, 5, 6, 8, generator=gen).to(DEVICE)
    with counting_kernel_calls() as calls, torch.no_grad():
        on_kernels = block(x)
        kernels.set_enabled(False)
        try:
            on_torch = block(x)
        finally:
            kernels.set_enabled(None)
        assert calls == {"dwconv": 2, "projection": 1}, "set_enabled(False) must keep the block on torch"
        monkeypatch.setenv("DELTACONV_TRITON", "0")
        block(x)
        assert calls == {"dwconv": 2, "projection": 1}, "DELTACONV_TRITON=0 must keep the block on torch"
        monkeypatch.delenv("DELTACONV_TRITON")
        many = BlockConfig(dim=8, kernel_size=3, scales=(1.0, 0.5, 0.25, 0.2, 0.1))
        block_many = random_block(many, gen).to(device=DEVICE, dtype=torch.float32)
        out_many = block_many(x)
    assert calls == {"dwconv": 2, "projection": 1} and kernels.failure() is None
    assert_close_rel(on_kernels, on_torch, 1e-5, "kernels vs torch path")
    ref = reference_block_forward(block_many.state_dict(), many, x.double().cpu())
    assert_close_rel(out_many, ref, 1e-5, "5 scales on torch")


def test_failure_switches_the_kernel_path_off(monkeypatch, caplog):
    gen = torch.Generator().manual_seed(73)
    cfg = BlockConfig(dim=8, kernel_size=3, scales=(1.0, 0.5))
    block = random_block(cfg, gen).to(device=DEVICE, dtype=torch.float32)
    x = torch.randn(1, 4, 5, 8, generator=gen).to(DEVICE)
    with torch.no_grad():
        expected = block(x)
    monkeypatch.setattr(kernels, "_failure", None)
    tries = []

    def raising(error):
        def fn(*args):
            tries.append(error)
            raise error
        return fn

    monkeypatch.setattr(kernels, "delta_conv_triton", raising(torch.cuda.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        block(x)
    assert kernels.failure() is None, "out of memory must not switch the kernels off"
    monkeypatch.setattr(kernels, "delta_conv_triton", raising(RuntimeError("no C compiler")))
    with torch.no_grad():
        fallback = block(x)  # the torch path, same result
    assert "no C compiler" in kernels.failure() and "switched off" in caplog.text
    assert_close_rel(fallback, expected, 1e-5, "fallback")
    with torch.no_grad():
        block(x)
    assert len(tries) == 2, "after a failure the kernels must not be tried again"


def test_backward_failure_falls_back_before_training_starts(monkeypatch, caplog):
    """A backward kernel that cannot compile or launch is found on the first call with gradients, when the block
    can still take the torch path, not inside loss.backward(); the probe runs once per configuration."""
    gen = torch.Generator().manual_seed(79)
    cfg = BlockConfig(dim=8, kernel_size=3, scales=(1.0, 0.5), dw_bias=True)
    block = random_block(cfg, gen).to(device=DEVICE, dtype=torch.float32)
    x = torch.randn(2, 5, 4, 8, generator=gen).to(DEVICE)
    monkeypatch.setattr(kernels, "_failure", None)
    with counting_kernel_calls() as calls:
        block(x.requires_grad_())
        assert calls == {"dwconv": 4, "projection": 2}, "first call with gradients: a probe, then the real call"
        block(x)
        assert calls == {"dwconv": 6, "projection": 3}, "the probe runs once per configuration"

    def failing_backward(*args):
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(dwconv_gate, "_backward", failing_backward)
    smaller = x[:, :4].detach().clone().requires_grad_()  # another size: a configuration not probed yet
    out = block(smaller)
    assert "ptxas failed" in kernels.failure() and "switched off" in caplog.text
    assert_close_rel(out, reference_block_forward(block.state_dict(), cfg, smaller.detach().double().cpu()), 1e-5,
                     "torch path after the failure")
    out.square().sum().backward()  # the torch path's backward: no kernel involved
    assert smaller.grad is not None and all(p.grad is not None for p in block.parameters())
