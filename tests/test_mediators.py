"""MediatorAttention (deltaconv_core/mediators.py) against the independent float64 reference, its grid choice,
dtypes, gradients and teacher initialisation; the step-wise schedule (deltaconv_core/mediator_schedule.py)."""
import contextlib
import itertools
import math

import comfy.ops
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import CrossAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

import deltaconv_core.mediators as mediators_mod
from deltaconv_core.mediator_schedule import MediatorSchedule, ScheduleError, SigmaCounts
from deltaconv_core.mediators import (
    MediatorAttention,
    MediatorConfig,
    mediator_grid,
    mediator_macs,
)
from deltaconv_core.reference import reference_adaptive_avg_pool, reference_mediator_forward, reference_softmax
from deltaconv_core.students import build_student

GRIDS = [(7, 5), (9, 12), (13, 1), (16, 16), (1, 1)]
COUNTS = [1, 4, 16, 64, 1000]  # 1000: more than the tokens of every grid here, clamps to the whole grid


def randomize_(module, gen, scale=0.5):
    """Every parameter (the zero-initialised DWC included) to seeded noise, so no term is trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return module


def make_student(dim, heads, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return randomize_(build_student(MediatorConfig(dim, heads), dtype=dtype), gen), gen


# ------------------------------------------------------------------------------------------------ parity
PARITY = [pytest.param(hw, n, batch, heads, 2000 + i, id=f"{hw[0]}x{hw[1]}-n{n}-b{batch}-h{heads}")
          for i, (hw, n, batch, heads) in enumerate(itertools.product(GRIDS, COUNTS, (1, 3), (1, 3)))]


@pytest.mark.parametrize("hw,n,batch,heads,seed", PARITY)
def test_matches_float64_reference(hw, n, batch, heads, seed):
    student, gen = make_student(12, heads, seed)
    x = torch.randn(batch, *hw, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = student(x, mediators=n)
    grid = mediator_grid(n, *hw)
    ref = reference_mediator_forward(student.state_dict(), heads, x, grid)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_count_above_tokens_is_the_whole_grid():
    student, gen = make_student(8, 2, seed=3)
    x = torch.randn(2, 6, 4, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(student(x, 24), student(x, 10_000))
        assert not torch.allclose(student(x, 24), student(x, 4))  # the count changes the result


def floor_window_pool(x, out_hw):
    """A plausible wrong pooling: non-overlapping [⌊iH/p⌋, ⌊(i+1)H/p⌋) windows (reshape-mean style)."""
    rows = [(i * x.shape[2] // out_hw[0], (i + 1) * x.shape[2] // out_hw[0]) for i in range(out_hw[0])]
    cols = [(j * x.shape[3] // out_hw[1], (j + 1) * x.shape[3] // out_hw[1]) for j in range(out_hw[1])]
    return torch.stack([torch.stack([x[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for c0, c1 in cols], -1)
                        for r0, r1 in rows], -2)


@pytest.mark.parametrize("hw,n", [((7, 5), 16), ((9, 12), 16), ((13, 1), 4)])
def test_reference_catches_wrong_pooling_and_swapped_grid(monkeypatch, hw, n):
    student, gen = make_student(12, 3, seed=9)
    x = torch.randn(2, *hw, 12, generator=gen, dtype=torch.float64)
    grid = mediator_grid(n, *hw)
    ref = reference_mediator_forward(student.state_dict(), 3, x, grid)
    with monkeypatch.context() as m:
        m.setattr(mediators_mod.F, "adaptive_avg_pool2d", floor_window_pool)
        with torch.no_grad():
            wrong = student(x, n)
    assert (wrong - ref).abs().max() > 1e-3
    if grid[0] != grid[1]:
        swapped = reference_mediator_forward(student.state_dict(), 3, x, grid[::-1])
        assert (swapped - ref).abs().max() > 1e-3


def test_single_mediator_by_hand():
    # n = 1: the mediator is the mean query; softmax over one mediator is 1, so (zero DWC) every token gets
    # proj(softmax(t·Kᵀ/√d)·V), the same vector everywhere.
    student, gen = make_student(6, 2, seed=4)
    with torch.no_grad():
        student.dwc.weight.zero_()
        student.dwc.bias.zero_()
        x = torch.randn(1, 5, 3, 6, generator=gen, dtype=torch.float64)
        out = student(x, 1)
    p = {k: v.detach() for k, v in student.state_dict().items()}
    tokens = x.reshape(15, 6)
    q, k, v = (tokens @ p["qkv.weight"].T + p["qkv.bias"]).split(6, dim=-1)
    t = q.mean(dim=0)
    mixed = torch.cat([torch.softmax(k[:, h * 3:(h + 1) * 3] @ t[h * 3:(h + 1) * 3] / math.sqrt(3), 0)
                       @ v[:, h * 3:(h + 1) * 3] for h in range(2)])
    expected = p["proj.weight"] @ mixed + p["proj.bias"]
    torch.testing.assert_close(out, expected.expand(1, 5, 3, 6), rtol=1e-12, atol=1e-12)


def test_reference_helpers_match_torch():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 30
    torch.testing.assert_close(reference_softmax(logits), torch.softmax(logits, -1), rtol=1e-12, atol=1e-14)
    x = torch.randn(2, 3, 9, 12, generator=gen, dtype=torch.float64)
    assert (floor_window_pool(x, (4, 5)) - reference_adaptive_avg_pool(x, (4, 5))).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- grid choice
@pytest.mark.parametrize("n,hw,expected", [
    (16, (64, 64), (4, 4)), (64, (64, 64), (8, 8)), (4, (128, 128), (2, 2)), (1, (9, 12), (1, 1)),
    (64, (152, 104), (9, 7)), (16, (152, 104), (5, 3)), (4, (152, 104), (2, 2)),  # 1216×832 latent, finest level
    (64, (104, 152), (7, 9)), (64, (13, 1), (13, 1)), (4, (13, 1), (4, 1)), (1000, (7, 5), (7, 5)),
    (7, (8, 8), (2, 3)),  # a prime count: a 7×1 strip of cells would be far from square
])
def test_mediator_grid_choices(n, hw, expected):
    assert mediator_grid(n, *hw) == expected


@pytest.mark.parametrize("hw", [(152, 104), (76, 52), (38, 26), (19, 13), (10, 7), (7, 5), (9, 12), (13, 1),
                                (1, 13), (2, 2), (1, 1), (96, 160)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16, 50, 64, 256])
def test_mediator_grid_bounds(hw, n):
    ph, pw = mediator_grid(n, *hw)
    h, w = hw
    assert 1 <= ph <= h and 1 <= pw <= w
    assert ph * pw <= min(n, h * w)
    if n >= h * w:
        assert (ph, pw) == (h, w)
    if h >= 4 and w >= 4 and n in (16, 64):  # UNet-sized grids: close to the asked count, oriented like the grid
        assert ph * pw >= 0.9 * min(n, h * w)
        assert (ph >= pw) == (h >= w) or ph == pw


@pytest.mark.parametrize("args", [(0, 4, 4), (4, 0, 4), (4, 4, 0), (-1, 4, 4)])
def test_mediator_grid_rejects_empty(args):
    with pytest.raises(ValueError, match="mediator_grid"):
        mediator_grid(*args)


# ---------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_parameter():
    student, gen = make_student(12, 3, seed=13, dtype=torch.float32)
    x = torch.randn(2, 7, 5, 12, generator=gen)
    student(x, 4).square().mean().backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    key_bias = student.qkv.bias.grad[12:24]  # keys: a shared shift of all logits, softmax ignores it
    assert key_bias.abs().max() < 1e-6
    for name, p in student.named_parameters():
        grad = torch.cat([p.grad[:12], p.grad[24:]]) if name == "qkv.bias" else p.grad
        assert grad.abs().min() > 0 if name == "dwc.bias" else grad.abs().max() > 1e-4, name


def test_fresh_student_has_zero_dwc_and_still_learns_it():
    student = build_student(MediatorConfig(8, 2))
    assert not student.dwc.weight.any() and not student.dwc.bias.any()
    x = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(1))
    student(x, 4).sum().backward()
    assert student.dwc.weight.grad.abs().max() > 0


def test_gradcheck_wrt_input():
    student, gen = make_student(6, 2, seed=21)
    x = torch.randn(1, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: student(t, 4), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- dtypes
def dtype_student(logit_scale=1.0):
    """fp32 student and input; logit_scale multiplies the query/key projections (400: logits ~1e5, past fp16's
    65504, while q and k themselves stay representable)."""
    student, gen = make_student(8, 1, seed=17, dtype=torch.float32)
    with torch.no_grad():
        student.qkv.weight[:16] *= logit_scale
        student.qkv.bias[:16] = 0
    return student, torch.randn(2, 6, 5, 8, generator=gen)


def relative_error(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@contextlib.contextmanager
def fp16_math_attention():
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_logits_do_not_overflow(dtype):
    student, x = dtype_student(logit_scale=400)
    with torch.no_grad():
        q, k, _ = student.to(dtype).qkv(x.to(dtype)).chunk(3, -1)
        logits = q.reshape(-1, 30, 8) @ k.reshape(-1, 30, 8).transpose(1, 2) / math.sqrt(8)
        assert q.abs().max() < 6e4  # the projections themselves are representable
        out = student(x.to(dtype), 16)
        with fp16_math_attention():  # SDPA's math path with fp16 reductions, as older torch always did
            reduced = student(x.to(dtype), 16)
            assert torch.isfinite(reduced).all()
            assert dtype == torch.bfloat16 or torch.equal(reduced, out)  # fp16 never reaches that path
            plain = F.scaled_dot_product_attention(*(z.reshape(2, 1, 30, 8) for z in (q, k, q)))
        ref = student.double()(x.to(dtype).double(), 16)  # same rounded inputs and weights, exact maths
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float16:  # the setup does overflow when logits are materialised in fp16
        assert not torch.isfinite(logits).all() and not torch.isfinite(plain).all()
        assert relative_error(out, ref) < 3e-2
    # bf16 cannot overflow here, but its 8-bit mantissa moves logits of 1e5 by hundreds, which reorders
    # near-tied keys: only finiteness is meaningful at this scale (accuracy: the next test)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(dtype):
    student, x = dtype_student()
    with torch.no_grad():
        ref = student(x, 16)
        out = student.to(dtype)(x.to(dtype), 16)
    assert out.dtype == dtype and relative_error(out, ref) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_with_fp32_weights(dtype):
    """Distillation's mixed precision: fp32 parameters under autocast; gradients reach them in fp32."""
    student, x = dtype_student()
    with torch.no_grad():
        ref = student(x, 16)
    with torch.autocast("cpu", dtype=dtype):
        out = student(x, 16)
    assert torch.isfinite(out).all() and relative_error(out, ref) < 3e-2
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in student.parameters())


@pytest.mark.parametrize("logit_scale", [1, 400])
def test_autocast_fp16_attention_runs_in_fp32(monkeypatch, logit_scale):
    """Under fp16 autocast the attentions still get fp32 inputs (autocast would otherwise cast them back)."""
    student, x = dtype_student(logit_scale)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v):
        out = sdpa(q, k, v)
        seen.append((q.dtype, out.dtype))
        return out

    monkeypatch.setattr(mediators_mod.F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = student(x, 16)
    assert seen == [(torch.float32, torch.float32)] * 2
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ from_teacher
def sd_attn1(dim=16, heads=4, seed=0):
    attn = CrossAttention(dim, heads=heads, dim_head=dim // heads, operations=comfy.ops.disable_weight_init)
    return randomize_(attn.float(), torch.Generator().manual_seed(seed))


def pixart_attn(dim=16, heads=4, seed=0, qk_norm=False):
    blocks = pytest.importorskip("comfy.ldm.pixart.blocks", reason="this ComfyUI has no PixArt")
    attn = blocks.AttentionKVCompress(dim, num_heads=heads, qk_norm=qk_norm, operations=comfy.ops.disable_weight_init)
    return randomize_(attn.float(), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["sd", "pixart"])
def test_from_teacher_reproduces_projections(kind):
    teacher = sd_attn1(seed=1) if kind == "sd" else pixart_attn(seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = MediatorAttention.from_teacher(teacher, MediatorSchedule.parse("0:4,0.5:16"))
    assert student.config == MediatorConfig(16, 4, MediatorSchedule.parse("0:4,0.5:16"))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q, k, v = student.qkv(x).chunk(3, dim=-1)
        if kind == "sd":
            expected = (teacher.to_q(x), teacher.to_k(x), teacher.to_v(x))
            assert not student.qkv.bias.any()  # SD's to_q/k/v have no bias
            torch.testing.assert_close(student.proj(x), teacher.to_out(x), rtol=0, atol=0)
        else:
            expected = teacher.qkv(x).chunk(3, dim=-1)
            torch.testing.assert_close(student.proj(x), teacher.proj(x), rtol=0, atol=0)
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not student.dwc.weight.any() and not student.dwc.bias.any()
    # the student owns trainable copies: training it leaves the teacher untouched
    assert all(p.requires_grad for p in student.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_from_teacher_casts_to_the_requested_dtype():
    student = MediatorAttention.from_teacher(sd_attn1(seed=4), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())


def test_from_teacher_refuses_other_modules():
    with pytest.raises(ValueError, match="Linear is none of the self-attention modules ΔConv knows: an SD"):
        MediatorAttention.from_teacher(torch.nn.Linear(4, 4))
    wide = CrossAttention(16, heads=4, dim_head=8, operations=comfy.ops.disable_weight_init)  # inner 32 ≠ 16
    with pytest.raises(ValueError, match="channel count 16"):
        MediatorAttention.from_teacher(wide)
    with pytest.raises(ValueError, match="q_norm"):  # last: skips where this ComfyUI has no PixArt
        MediatorAttention.from_teacher(pixart_attn(qk_norm=True))


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=12, heads=5), "divisible"), (dict(dim=0, heads=1), "divisible"), (dict(dim=12, heads=0), "divisible"),
    (dict(dim=12.0, heads=3), "integer"), (dict(dim=12, heads=3, schedule="0:0"), "whole number"),
    (dict(dim=12, heads=3, schedule=16), "MediatorSchedule"),
])
def test_config_rejects_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MediatorConfig(**kwargs)


def test_config_round_trips():
    cfg = MediatorConfig(320, 5, "0:4, 0.25:16 ,0.8:64")
    assert cfg.schedule == MediatorSchedule((0.0, 0.25, 0.8), (4, 16, 64))
    d = cfg.to_dict()
    assert d == {"student": "mediators", "dim": 320, "heads": 5, "schedule": "0.0:4,0.25:16,0.8:64"}
    assert MediatorConfig.from_dict(d) == cfg
    for broken in ({"dim": 320, "heads": 5}, {**d, "kernel_size": 3}):
        with pytest.raises(ValueError, match="exactly dim, heads and schedule"):
            MediatorConfig.from_dict(broken)


# --------------------------------------------------------------------------------------------------- MACs
def test_macs_formula():
    n, c = 64 * 64, 320  # SD1.5 finest level at 512²: the core drops from 2N²C = 10.7 G to 0.35 G
    assert 2 * n * n * c == pytest.approx(10.7e9, rel=1e-2)
    assert mediator_macs((64, 64), c, 64) - 4 * n * c * c == 4 * 64 * n * c + 9 * n * c == pytest.approx(0.347e9,
                                                                                                           rel=1e-2)
    # SiT-S/2 (N=256, C=384, 12 layers, 6.06 G with full attention): the paper's 5.49 / 5.55 / 5.78 G
    for count, paper in ((4, 5.49), (16, 5.55), (64, 5.78)):
        total = 6.06e9 - 12 * (4 * 256 * 384 ** 2 + 2 * 256 ** 2 * 384) + 12 * mediator_macs((16, 16), 384, count)
        assert total / 1e9 == pytest.approx(paper, abs=0.015)
    assert mediator_macs((152, 104), c, 16) == 4 * 152 * 104 * c * (c + 15) + 9 * 152 * 104 * c  # 5×3 used


# ----------------------------------------------------------------------------------------------- schedule
def test_schedule_parse_format_and_lookup():
    s = MediatorSchedule.parse("0.0:4,0.5:16,0.8:64")
    assert s.starts == (0.0, 0.5, 0.8) and s.counts == (4, 16, 64)
    assert s.format() == "0.0:4,0.5:16,0.8:64" and MediatorSchedule.parse(s.format()) == s
    assert [s.count_at(p) for p in (-0.1, 0.0, 0.49, 0.5, 0.79, 0.8, 1.0, 1.5)] == [4, 4, 4, 16, 16, 64, 64, 64]
    assert s.segments() == [(0.0, 0.5, 4), (0.5, 0.8, 16), (0.8, 1.0, 64)]
    assert MediatorSchedule.parse(" 16 ") == MediatorSchedule.fixed(16) == MediatorSchedule((0.0,), (16,))
    assert MediatorSchedule.parse("0:64,0.9:4").count_at(0.95) == 4  # any order of counts is allowed
    repeated = MediatorSchedule.parse("0:4,0.3:16,0.6:4")
    assert repeated.distinct_counts() == (4, 16)
    assert repeated.percent_ranges(4) == [(0.0, 0.3), (0.6, 1.0)]
    with pytest.raises(ScheduleError, match="count 8 is not in the schedule"):
        repeated.percent_ranges(8)


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("   ", "empty"), ("0.5-16", "not a number"), ("0:4,16", "not start:count"),
    ("4,16", "not start:count"), ("0:4:8", "not start:count"), ("a:4", "start 'a' is not a number"),
    ("0:x", "count 'x' is not a number"), ("0:0", "whole number"), ("0:2.5", "whole number"), ("0:-4", "whole number"),
    ("0:inf", "whole number"), ("0.2:4", "first entry must start at 0.0"), ("0:4,1.0:16", r"outside \[0, 1\)"),
    ("0:4,nan:16", "outside"), ("0:4,-0.5:8", "outside"), ("0:4,0.5:16,0.5:64", "increase strictly"),
    ("0:4,0.6:16,0.3:64", "0.6 is followed by 0.3"), ("0", "whole number"),
])
def test_schedule_errors(text, match):
    with pytest.raises(ScheduleError, match=match):
        MediatorSchedule.parse(text)


def test_schedule_constructor_validates():
    with pytest.raises(ScheduleError, match="one count per start"):
        MediatorSchedule((0.0, 0.5), (4,))
    with pytest.raises(ScheduleError, match="whole number"):
        MediatorSchedule((0.0,), (True,))


def test_schedule_on_sigmas_agrees_with_percent():
    s = MediatorSchedule.parse("0.0:4,0.5:16,0.8:64")

    def percent_to_sigma(p):  # monotone like ComfyUI's model_sampling: huge at 0, small at 1
        return 1e9 if p <= 0 else 14.6 * (1 - p) ** 3 + 0.03

    by_sigma = s.resolve(percent_to_sigma)
    assert by_sigma == SigmaCounts((1e9, percent_to_sigma(0.5), percent_to_sigma(0.8)), (4, 16, 64))
    for p in [i / 200 for i in range(1, 200)]:
        assert by_sigma(percent_to_sigma(p)) == s.count_at(p), p
    assert by_sigma(percent_to_sigma(0.5)) == 16 and by_sigma(2e9) == 4  # boundaries as count_at


def test_training_counts_cover_every_count_deterministically():
    s = MediatorSchedule.parse("0:4,0.3:16,0.6:4,0.8:64")
    drawn = [s.training_count(step, seed=7) for step in range(300)]
    for r in range(100):  # every round of 3 steps trains each distinct count once
        assert sorted(drawn[3 * r:3 * r + 3]) == [4, 16, 64]
    assert drawn == [s.training_count(step, seed=7) for step in range(300)]  # a pure function: resumable
    assert drawn != [s.training_count(step, seed=8) for step in range(300)]
    assert len({tuple(drawn[3 * r:3 * r + 3]) for r in range(100)}) > 1  # shuffled, not a fixed cycle
    assert {MediatorSchedule.fixed(16).training_count(i) for i in range(10)} == {16}
