"""ΔConvBlock (deltaconv_core/block.py) against the official maths (docs/design.md) and the float64 reference."""
import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from deltaconv_core.block import BlockConfig
from deltaconv_core.reference import reference_adaptive_avg_pool, reference_bilinear_resize, reference_block_forward
from deltaconv_core.students import build_student

SCALES = {"1": (1.0,), "2": (1.0, 0.5), "3": (1.0, 0.5, 1 / 3)}
SIZES = [(7, 5), (1, 3), (9, 13), (16, 16), (3, 1)]


def randomize_(block, gen, scale=0.5):
    """Overwrite every parameter (depthwise bias included) with seeded noise, so no term is trivially zero."""
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return block


def make_block(cfg, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return randomize_(build_student(cfg, dtype=dtype), gen), gen


# ------------------------------------------------------------------------------------------------ parity
# Every (gate, #scales, dw_bias, size, batch) combination, each with its own seed; C and k vary with the seed
# (k larger than the grid included, so zero padding on tiny grids is exercised).
PARITY = [pytest.param(g, s, b, hw, bs, 1000 + i, id=f"{g}-{s}sc-{'bias' if b else 'nobias'}-{hw[0]}x{hw[1]}-b{bs}")
          for i, (g, s, b, hw, bs) in enumerate(itertools.product(("scaled", "sigmoid"), SCALES, (False, True),
                                                                   SIZES, (1, 3)))]


@pytest.mark.parametrize("gate,n_scales,dw_bias,hw,batch,seed", PARITY)
def test_block_matches_float64_reference(gate, n_scales, dw_bias, hw, batch, seed):
    dim, k = (8, 12, 20)[seed % 3], (1, 3, 5, 7)[seed % 4]
    cfg = BlockConfig(dim=dim, kernel_size=k, scales=SCALES[n_scales], gate=gate, dw_bias=dw_bias)
    block, gen = make_block(cfg, seed)
    x = torch.randn(batch, *hw, dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
    state = block.state_dict()
    ref = reference_block_forward(state, cfg, x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if dw_bias:  # the random depthwise bias must actually change the result, otherwise the case proves nothing
        no_bias = {n: (torch.zeros_like(t) if n.endswith("conv_spatial.bias") else t) for n, t in state.items()}
        assert (reference_block_forward(no_bias, cfg, x) - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------ reference helpers vs torch
@pytest.mark.parametrize("in_hw,out_hw", [((7, 5), (3, 2)), ((9, 13), (4, 6)), ((13, 9), (4, 3)), ((10, 7), (3, 3)),
                                          ((1, 3), (1, 1)), ((5, 5), (5, 5)), ((3, 2), (5, 7))])
def test_reference_adaptive_avg_pool_matches_torch(in_hw, out_hw):
    x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(sum(in_hw) * 31 + sum(out_hw)),
                    dtype=torch.float64)
    torch.testing.assert_close(reference_adaptive_avg_pool(x, out_hw), F.adaptive_avg_pool2d(x, out_hw),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_hw,out_hw", [((3, 2), (7, 5)), ((4, 6), (9, 13)), ((1, 1), (3, 1)), ((2, 5), (5, 11)),
                                          ((1, 3), (1, 3)), ((8, 8), (16, 16)), ((7, 5), (3, 2))])
def test_reference_bilinear_matches_torch(in_hw, out_hw):
    x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(sum(in_hw) * 17 + sum(out_hw)),
                    dtype=torch.float64)
    expected = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(reference_bilinear_resize(x, out_hw), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- gate maths
@pytest.mark.parametrize("dim,constant", [(320, 8.944), (640, 12.649), (1280, 17.889)])
def test_scaled_gate_constant_is_sqrt_of_half_inner_dim(dim, constant):
    # The authors' code (which trained the released weights) multiplies by sqrt(C_i/2) = sqrt(C/4), NOT the
    # paper's 1/sqrt(C').
    block = build_student(BlockConfig(dim, 7), device="meta")
    for gate in block.gates:
        assert gate.gate_constant == pytest.approx(math.sqrt(dim / 4), rel=1e-12)
        assert gate.gate_constant == pytest.approx(constant, abs=1e-3)


@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
def test_single_pixel_hand_computation(gate):
    # C=320, k=1, one scale, a 1×1 grid: every op reduces to vectors, computed here by hand.
    cfg = BlockConfig(320, 1, (1.0,), gate)
    block, gen = make_block(cfg, seed=7, dtype=torch.float64)
    x = torch.randn(320, generator=gen, dtype=torch.float64)
    p = {n: t.detach() for n, t in block.state_dict().items()}
    u = p["conv_up.weight"] @ x + p["conv_up.bias"]  # 160
    v = u * p["gates.0.conv_spatial.weight"][0, 0]  # 1×1 depthwise = per-channel scale
    a, b = v[:80], v[80:]
    y = a * b * math.sqrt(80) if gate == "scaled" else a / (1 + torch.exp(-b))
    expected = p["conv_out.weight"] @ y + p["conv_out.bias"] + p["conv_pool.weight"] @ x + p["conv_pool.bias"]
    with torch.no_grad():
        out = block(x.view(1, 1, 1, 320))[0, 0, 0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if gate == "scaled":  # sanity: the paper's constant would give a clearly different answer
        paper = p["conv_out.weight"] @ (a * b / math.sqrt(160)) + p["conv_out.bias"] + p["conv_pool.weight"] @ x \
            + p["conv_pool.bias"]
        assert (out - paper).abs().max() > 1e-2


def test_pool_branch_reads_block_input():
    # With conv_out zeroed only the global branch is left: conv_pool(mean_{H,W} x), the same at every pixel.
    cfg = BlockConfig(16, 3, (1.0, 0.5))
    block, gen = make_block(cfg, seed=11)
    with torch.no_grad():
        block.conv_out.weight.zero_()
        block.conv_out.bias.zero_()
        x = torch.randn(2, 5, 7, 16, generator=gen, dtype=torch.float64)
        out = block(x)
    expected = x.mean(dim=(1, 2)) @ block.conv_pool.weight.detach().T + block.conv_pool.bias.detach()  # [B, C]
    torch.testing.assert_close(out, expected[:, None, None, :].expand_as(out), rtol=1e-12, atol=1e-12)
    assert (out[0] - out[1]).abs().max() > 1e-3  # the branch depends on each sample's own input


# ------------------------------------------------------------------------------------ dtypes and memory
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
def test_half_precision_on_cpu_close_to_fp32(dtype, gate):
    cfg = BlockConfig(64, 5, (1.0, 0.5), gate)
    torch.manual_seed(3)
    block = build_student(cfg)
    x = torch.randn(2, 9, 7, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = block(x)
        out = block.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, f"{dtype}: max error {err:.3g} of the output scale"


@pytest.mark.parametrize("n_scales", ["2", "3"])
def test_autocast_bf16_fp32_weights(n_scales):
    """Distillation's mixed precision: fp32 parameters and input under bf16 autocast (several scales: the output
    projection accumulates in place, which autocast does not cast for); gradients reach the fp32 parameters."""
    cfg = BlockConfig(32, 3, SCALES[n_scales], "sigmoid")
    block, gen = make_block(cfg, seed=5, dtype=torch.float32)
    x = torch.randn(2, 7, 6, 32, generator=gen)
    with torch.no_grad():
        ref = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, f"max error {err:.3g} of the output scale"
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters())


@pytest.mark.parametrize("n_scales", list(SCALES))
@pytest.mark.parametrize("hw", [(7, 5), (1, 3), (1, 1), (16, 16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_is_contiguous_bhwc(n_scales, hw, batch):
    block = build_student(BlockConfig(8, 3, SCALES[n_scales]))
    x = torch.randn(batch, *hw, 8)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (batch, *hw, 8)
    assert out.is_contiguous()


# -------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
def test_gradcheck_wrt_input(gate):
    cfg = BlockConfig(8, 3, (1.0, 0.5), gate, dw_bias=True)
    block, gen = make_block(cfg, seed=21)
    x = torch.randn(1, 5, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs", [
    dict(dim=6, kernel_size=3), dict(dim=322, kernel_size=3), dict(dim=2, kernel_size=3),  # dim % 4
    dict(dim=16, kernel_size=4), dict(dim=16, kernel_size=0), dict(dim=16, kernel_size=-3),  # kernel
    dict(dim=16, kernel_size=3, gate="paper"), dict(dim=16, kernel_size=3, gate="Scaled"),  # gate
    dict(dim=16, kernel_size=3, scales=(0.5, 1.0)), dict(dim=16, kernel_size=3, scales=()),  # scales
    dict(dim=16, kernel_size=3, scales=(1.0, 0.0)), dict(dim=16, kernel_size=3, scales=(1.0, 2.0)),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_config_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        BlockConfig(**kwargs)


def test_config_normalises_and_round_trips():
    cfg = BlockConfig(dim=16, kernel_size=3, scales=[1, 0.5], gate="sigmoid", dw_bias=True)
    assert cfg.scales == (1.0, 0.5) and all(isinstance(s, float) for s in cfg.scales)
    assert cfg.inner_dim == 8
    assert BlockConfig.from_dict(cfg.to_dict()) == cfg


def official_param_count(c, k, n, dw_bias):
    """Per layer: P = (C·C/2 + C/2) + n·k²·C/2 [+ n·C/2] + ((C/4)·n·C + C) + (C² + C), exact arithmetic."""
    c = Fraction(c)
    p = (c * c / 2 + c / 2) + n * k * k * c / 2 + (c / 4 * n * c + c) + (c * c + c) + (n * c / 2 if dw_bias else 0)
    assert p.denominator == 1
    return int(p)


@pytest.mark.parametrize("c,k,expected", [(320, 7, 221_280), (1152, 13, 2_851_776)])
def test_param_count_two_scales(c, k, expected):
    # closed form for n=2: 2C² + k²C + 2.5C, and +C with the old depthwise bias
    assert 2 * c * c + k * k * c + 5 * c // 2 == expected == official_param_count(c, k, 2, False)
    for dw_bias, extra in ((False, 0), (True, c)):
        block = build_student(BlockConfig(c, k, (1.0, 0.5), dw_bias=dw_bias), device="meta")
        assert sum(p.numel() for p in block.parameters()) == expected + extra


@pytest.mark.parametrize("c,k", [(320, 7), (1152, 13), (640, 9)])
@pytest.mark.parametrize("dw_bias", [False, True])
def test_param_count_three_scales(c, k, dw_bias):
    # n=3: 2.25C² + 1.5k²C + 2.5C (+1.5C with depthwise bias)
    closed = Fraction(9, 4) * c * c + Fraction(3, 2) * k * k * c + Fraction(5, 2) * c
    closed += Fraction(3, 2) * c if dw_bias else 0
    assert closed == official_param_count(c, k, 3, dw_bias)
    block = build_student(BlockConfig(c, k, (1.0, 0.5, 1 / 3), dw_bias=dw_bias), device="meta")
    assert sum(p.numel() for p in block.parameters()) == closed


# ------------------------------------------------------------------------------------------- fresh init
@pytest.mark.parametrize("c,k,dw_bias", [(1152, 13, False), (320, 7, True)])
def test_fresh_init(c, k, dw_bias):
    torch.manual_seed(5)
    block = build_student(BlockConfig(c, k, (1.0, 0.5), dw_bias=dw_bias))
    for name, p in block.named_parameters():
        assert torch.isfinite(p).all(), name
    # The official init: kaiming_uniform_ on the [k, k, C_i] tensor ⇒ fan_in = k·C_i ⇒ U(±sqrt(6/(k·C_i)))
    bound = math.sqrt(6 / (k * c // 2))
    for gate in block.gates:
        w = gate.conv_spatial.weight.detach()
        assert w.shape == (k, k, c // 2)
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.95 * bound  # many samples: the range is actually used, not a tiny init
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        if dw_bias:
            assert torch.equal(gate.conv_spatial.bias.detach(), torch.zeros(c // 2))
        else:
            assert gate.conv_spatial.bias is None
    # Linear layers: PyTorch default, |w| ≤ 1/sqrt(fan_in) and not zero-initialised (the official init has no zero-init)
    for lin in (block.conv_up, block.conv_out, block.conv_pool):
        assert lin.weight.abs().max() <= 1 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max() > 0.9 / math.sqrt(lin.in_features)
        assert lin.bias.abs().max() > 0
