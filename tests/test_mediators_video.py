"""MediatorAttention on video token grids (t × h × w, Wan): against the independent float64 reference, the 3-D
mediator grid, its config in files, and its start from a Wan teacher's own q/k/v, q/k RMSNorms and output."""
import itertools
import math

import pytest
import torch

from deltaconv_core.mediators import (
    DWC_KERNEL,
    MediatorAttention,
    MediatorConfig,
    mediator_grid,
    mediator_grid_3d,
    mediator_macs,
)
from deltaconv_core.reference import reference_video_mediator_forward
from deltaconv_core.students import build_student, config_from_dict
from devkit.tiny_models import TINY_MODELS, has_wan

GRIDS = [(2, 5, 4), (3, 7, 5), (1, 6, 4), (4, 1, 3), (5, 2, 2)]
COUNTS = [1, 4, 16, 1000]  # 1000: more than the tokens of every grid here, clamps to the whole grid
EPS = 1e-6


def make_student(dim, heads, seed, qk_norm=True, time_kernel=DWC_KERNEL):
    """A float64 student with every parameter (zero-initialised DWCs, the norms' ones) seeded noise."""
    config = MediatorConfig(dim, heads, qk_norm_eps=EPS if qk_norm else None, time_kernel=time_kernel)
    student = build_student(config, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return student, gen


PARITY = [pytest.param(grid, n, heads, variant, 3000 + i, id=f"{'x'.join(map(str, grid))}-n{n}-h{heads}-{variant}")
          for i, (grid, n, heads, variant) in enumerate(itertools.product(
              GRIDS, COUNTS, (1, 3), ("wan", "no-norm", "no-time")))]


@pytest.mark.parametrize("grid,n,heads,variant,seed", PARITY)
def test_matches_float64_reference(grid, n, heads, variant, seed):
    student, gen = make_student(12, heads, seed, qk_norm=variant != "no-norm",
                                time_kernel=0 if variant == "no-time" else DWC_KERNEL)
    x = torch.randn(2, *grid, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = student(x, mediators=n)
        tokens = student.run(x.reshape(2, -1, 12), grid, n)
    ref = reference_video_mediator_forward(student.state_dict(), heads, x, mediator_grid_3d(n, *grid),
                                           None if variant == "no-norm" else EPS)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(tokens, out.reshape(2, -1, 12))


def test_reference_sees_time_axis_and_norms():
    """The reference is not blind to what the video path adds: the grid's axis order, the time DWC, the norms."""
    student, gen = make_student(12, 3, seed=7)
    x = torch.randn(1, 3, 6, 4, 12, generator=gen, dtype=torch.float64)
    state, grid = student.state_dict(), mediator_grid_3d(12, 3, 6, 4)
    assert grid == (2, 3, 2)
    with torch.no_grad():
        out = student(x, 12)
    ref = reference_video_mediator_forward(state, 3, x, grid, EPS)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    no_time = {k: v for k, v in state.items() if not k.startswith("dwc_time")}
    wrong = [reference_video_mediator_forward(no_time, 3, x, grid, EPS),
             reference_video_mediator_forward(state, 3, x, grid, None),
             reference_video_mediator_forward(state, 3, x, (3, 2, 2), EPS)]
    assert all((w - ref).abs().max() > 1e-3 for w in wrong)


def test_one_frame_is_the_image_student_per_frame():
    """Without a time DWC, a single-frame video is the image path (mediator_grid's choice, the same maths up to
    rounding: 3-D pooling and the per-frame reshape sum in another order)."""
    student, gen = make_student(12, 3, seed=8, time_kernel=0)
    x = torch.randn(2, 1, 6, 5, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(student(x, 16)[:, 0], student(x[:, 0], 16), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- grid choice
@pytest.mark.parametrize("n,grid,expected", [
    (4, (21, 30, 52), (1, 2, 2)), (16, (21, 30, 52), (2, 2, 4)),  # Wan 2.1 480p, 81 frames: 21 × 30 × 52 tokens
    (64, (21, 30, 52), (3, 3, 7)), (64, (21, 60, 104), (2, 4, 8)),  # ... and 720p: cells ~10 tokens a side
    (64, (2, 30, 52), (1, 6, 10)),  # two frames: cells cannot be deep, so time is not split
    (64, (21, 1, 1), (21, 1, 1)), (1000, (2, 3, 4), (2, 3, 4)), (64, (3, 4, 4), (3, 4, 4)),
])
def test_mediator_grid_3d_choices(n, grid, expected):
    assert mediator_grid_3d(n, *grid) == expected


@pytest.mark.parametrize("grid", [(1, 30, 52), (1, 7, 5), (1, 1, 13)])
@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_one_frame_takes_the_2d_rule(grid, n):
    assert mediator_grid_3d(n, *grid) == (1, *mediator_grid(n, *grid[1:]))


@pytest.mark.parametrize("grid", [(21, 30, 52), (3, 8, 8), (5, 2, 9), (2, 1, 1), (13, 4, 7)])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 64, 256])
def test_mediator_grid_3d_bounds(grid, n):
    cells = mediator_grid_3d(n, *grid)
    assert all(1 <= p <= size for p, size in zip(cells, grid))
    assert math.prod(cells) <= min(n, math.prod(grid))
    assert math.prod(cells) >= 0.75 * min(n, math.prod(grid)) or n == 7  # close to n (a prime count: not always)


@pytest.mark.parametrize("args", [(0, 2, 3, 4), (4, 0, 3, 4), (4, 2, 0, 4), (4, 2, 3, 0)])
def test_mediator_grid_3d_rejects_empty(args):
    with pytest.raises(ValueError, match="mediator_grid_3d"):
        mediator_grid_3d(*args)


def test_macs_count_the_time_dwc():
    c, grid = 64, (3, 8, 8)
    tokens, cells = 192, math.prod(mediator_grid_3d(16, *grid))
    assert mediator_macs(grid, c, 16, DWC_KERNEL) == 4 * tokens * c * c + 4 * cells * tokens * c + 12 * tokens * c
    config = MediatorConfig(c, 2, time_kernel=DWC_KERNEL)
    assert MediatorAttention.macs(config, grid, 16) == mediator_macs(grid, c, 16, DWC_KERNEL)


# ------------------------------------------------------------------------------------------- config and files
def test_config_stores_video_fields_only_when_set():
    image = MediatorConfig(64, 2)
    assert set(image.to_dict()) == {"student", "dim", "heads", "schedule"}  # image files as before
    video = MediatorConfig(64, 2, qk_norm_eps=EPS, time_kernel=DWC_KERNEL)
    assert video.to_dict()["qk_norm_eps"] == EPS and video.to_dict()["time_kernel"] == DWC_KERNEL
    assert config_from_dict(video.to_dict()) == video and config_from_dict(image.to_dict()) == image
    student = build_student(video)
    assert {k: tuple(v.shape) for k, v in student.state_dict().items()} == MediatorAttention.expected_shapes(video)
    assert "qk_norm_eps=1e-06, time_kernel=3" in repr(student)


@pytest.mark.parametrize("bad,match", [({"qk_norm_eps": "1e-6"}, "qk_norm_eps"), ({"qk_norm_eps": True}, "qk_norm_eps"),
                                       ({"time_kernel": 5}, "time_kernel"), ({"time_kernel": 3.0}, "time_kernel"),
                                       ({"frames": 3}, "unexpected")])
def test_config_rejects_bad_video_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({**MediatorConfig(64, 2).to_dict(), **bad})


# ------------------------------------------------------------------------------------------- from a Wan teacher
@pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
def test_starts_from_the_wan_teacher():
    """Copies of q/k/v/o and both RMSNorms (weights and eps), zero DWCs: the student's normalised queries and keys
    are the teacher's before RoPE, its values and output projection the teacher's."""
    from deltaconv_core.families import find_attention_sites

    model = TINY_MODELS["tiny_wan"].build(0).double()
    sites = find_attention_sites(model)
    teacher = model.get_submodule(sites.sites[0].path)
    with torch.no_grad():
        teacher.norm_q.weight.uniform_(0.5, 1.5)  # not the identity, so a dropped norm weight shows
    config = MediatorAttention.initial(sites.sites[0], teacher, sites).config
    assert config == MediatorConfig(teacher.dim, teacher.num_heads, qk_norm_eps=teacher.eps, time_kernel=DWC_KERNEL)
    student = MediatorAttention.from_teacher(teacher, dtype=torch.float64, family="wan", video=True)
    x = torch.randn(1, 6, teacher.dim, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = student.qkv(x).chunk(3, dim=-1)
        torch.testing.assert_close(student.norm_q(q), teacher.norm_q(teacher.q(x)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(student.norm_k(k), teacher.norm_k(teacher.k(x)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, teacher.v(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(student.proj(v), teacher.o(v), rtol=1e-12, atol=1e-12)
    assert not student.dwc.weight.any() and not student.dwc_time.weight.any()
    assert teacher.q.weight.data_ptr() != student.qkv.weight.data_ptr()  # its own copy
