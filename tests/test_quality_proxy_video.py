"""The video quality proxy (scripts/quality_proxy/video*.py): its clips, its teacher's one path between frames, the
pack's 3-D students inside it, and its smallest configuration end to end.

Quality at the smoke size means nothing; what must hold is that the clips are what they say, that frames meet only
in the teacher's 3-D attention (so removing it, the zero block, makes every frame its own), that the students run
on the t×h×w grid and carry information across frames, and that the numbers are finite and in order.
"""
import copy
import math
import os

import pytest
import torch
from torch import nn

from deltaconv_core.block import BlockConfig, DeltaConvBlock
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import DWC_KERNEL, mediator_macs
from quality_proxy.experiment import make_mediator_student, make_student
from quality_proxy.model import attention_blocks, denoise
from quality_proxy.video import TinyVideoUNet, synthetic_clips, video_grid
from quality_proxy.video_experiment import OFFICIAL, VIDEO_PRESETS, WAN, run
from quality_proxy.video_report import save

FRAMES, SIZE = 4, 16
KERNELS = dict.fromkeys(("down0_attn", "down1_attn", "up1_attn", "up0_attn"), 3)


def clips(seed, n=3):
    return synthetic_clips(n, FRAMES, SIZE, 2, torch.Generator().manual_seed(seed))


def test_clips_are_deterministic_and_move():
    a = clips(0)
    assert a.shape == (3, 3, FRAMES, SIZE, SIZE) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, clips(0)) and not torch.equal(a, clips(1))
    change = a.diff(dim=2).abs().mean(dim=(1, 3, 4))  # per clip and frame pair
    assert (change > 0.01).all()  # every clip moves between every pair of frames


class NoAttention(nn.Module):
    def forward(self, x, **kwargs):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return TinyVideoUNet(16, frames=FRAMES).eval()


def outputs(unet, x):
    with torch.no_grad():
        return denoise(unet, x, torch.full((x.shape[0],), 1.0))


def frame_zero_reaches(unet, x) -> float:
    """How much the denoised frames 1.. change when only frame 0 of the input does."""
    y = x.clone()
    y[:, :, 0] += 0.5
    return float((outputs(unet, y)[:, :, 1:] - outputs(unet, x)[:, :, 1:]).abs().max())


def test_zero_block_is_attention_removed_and_frames_meet_only_in_attention(teacher):
    x = clips(2, n=2)
    zero = make_student(teacher, KERNELS, (1.0, 0.5), True, zero=True, grid=video_grid, gate=WAN.gate,
                        time_kernel=WAN.time_kernel)[0]
    removed = copy.deepcopy(teacher)
    for tb in attention_blocks(removed).values():
        tb.attn1 = NoAttention()
    assert torch.equal(outputs(zero, x), outputs(removed, x))
    assert frame_zero_reaches(zero, x) == 0  # per-frame convolutions: no other path between frames
    assert frame_zero_reaches(teacher, x) > 1e-3


@pytest.mark.parametrize("kind", ["deltaconv", "mediators"])
def test_students_run_the_3d_grid_across_frames(teacher, kind):
    x = clips(3, n=2)
    if kind == "deltaconv":
        unet, runtime, students, _ = make_student(teacher, KERNELS, (1.0, 0.5), True, grid=video_grid,
                                                  gate=WAN.gate, time_kernel=WAN.time_kernel)
    else:
        schedule = MediatorSchedule.parse("16")
        unet, runtime, students, _ = make_mediator_student(teacher, schedule, grid=video_grid, video=True)
    with torch.no_grad():  # both start with zero weights over time: give them some, as training does
        for s in students.values():
            for conv in (getattr(s, "conv_time", None), getattr(s, "dwc_time", None)):
                if conv is not None:
                    conv.weight.normal_(0, 0.3)
    seen = []
    hooks = [s.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape))) for s in students.values()]
    try:
        reach = frame_zero_reaches(unet, x)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == {(2, FRAMES, SIZE // 2, SIZE // 2, 16), (2, FRAMES, SIZE // 4, SIZE // 4, 32)}
    assert runtime.counts[kind if kind == "deltaconv" else "mediators:16"] > 0 and reach > 1e-3
    assert not any(k.startswith("attention:") for k in runtime.counts)


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and immune to a busy machine's oversubscription
    try:
        return run(VIDEO_PRESETS["video_smoke"], cache=None)
    finally:
        torch.set_num_threads(threads)


def test_smoke_run_learns_and_is_finite(result):
    assert result["teacher_loss_end"] < 0.95 * result["teacher_loss_start"]
    stage_a = result["models"][OFFICIAL]["losses"]["A"]
    assert sum(stage_a[-10:]) < 0.5 * sum(stage_a[:10])
    for m in result["models"].values():
        numbers = [*m["mse"], *m["mse_ratio"], *(m[k] for k in ("psnr", "ssim", "temporal_error", "motion_ratio")
                                                 if k in m)]
        assert all(math.isfinite(v) for v in numbers)


def test_smoke_run_students_on_3d_grids_beat_the_zero_block(result):
    cfg, models = result["config"], result["models"]
    grids = [(cfg["frames"], cfg["size"] // 4, cfg["size"] // 4), (cfg["frames"], cfg["size"] // 2, cfg["size"] // 2)]
    zero = models["zero block (attention removed)"]
    assert zero["macs_per_run"] == 0 and zero["student_grids"] == grids
    for kind in ("deltaconv", "mediators"):
        (m,) = [m for m in models.values() if m["kind"] == kind]
        assert m["student_grids"] == grids
        assert 0 < m["macs_per_run"] < models["teacher"]["macs_per_run"]
        assert m["psnr"] > zero["psnr"] and m["temporal_error"] < zero["temporal_error"]
    (mediators,) = [m for m in models.values() if m["kind"] == "mediators"]
    assert len(mediators["calls"]) > 1 and sum(mediators["calls"].values()) == cfg["sample_steps"]


def test_smoke_run_costs_are_the_students_own(result):
    """The cost column against the students' own MAC counts on each site's t×h×w grid, per call made."""
    sites, models = result["sites"].values(), result["models"]
    steps = result["config"]["sample_steps"]
    grids = [(tuple(map(int, s["grid"].split("x"))), s["channels"], s["kernel"]) for s in sites]
    attention = sum(4 * math.prod(g) * c * c + 2 * math.prod(g) ** 2 * c for g, c, _ in grids)
    assert models["teacher"]["macs_per_run"] == steps * attention
    delta = sum(DeltaConvBlock.macs(BlockConfig(c, k, (1.0, 0.5), WAN.gate, time_kernel=WAN.time_kernel), g)
                for g, c, k in grids)
    assert models[OFFICIAL]["macs_per_run"] == steps * delta
    (mediators,) = [m for m in models.values() if m["kind"] == "mediators"]
    calls = {int(key.split(":")[1]): n for key, n in mediators["calls"].items()}
    assert mediators["macs_per_run"] == sum(n * mediator_macs(g, c, count, DWC_KERNEL)
                                            for count, n in calls.items() for g, c, _ in grids)


def test_smoke_report(result, tmp_path):
    paths = save(result, str(tmp_path), "test", "CPU test", "pytest")
    assert all(os.path.getsize(p) > 0 for p in paths)
    with open(paths[1]) as f:
        md = f.read()
    assert "zero block" in md and OFFICIAL in md and "mediators dynamic" in md and "temporal error" in md
