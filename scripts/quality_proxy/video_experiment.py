"""The video quality proxy: the image proxy's experiment (experiment.py) on clips. A small video UNet with full 3-D
self-attention (video.py) is trained on synthetic moving shapes, its attention's locality in space and time is
measured, and the pack's 3-D students are distilled from it with the same Distiller, wrappers and stages: the
3-D ΔConv block (BlockConfig.time_kernel, Wan's defaults) and its per-frame ablation (no conv over time, only the
clip-wide pool crosses frames), and mediator attention on a 3-D mediator grid. Each is compared with the teacher:
held-out denoising MSE across σ, same-seed samples (clip PSNR, per-frame SSIM, temporal consistency) and the
attention sites' MACs.

Temporal consistency: with D(x)_f = x_{f+1} − x_f a clip's frame-to-frame change, the temporal error of a student's
sample s against the teacher's sample r (same seed, pixel values in [0, 1]) is mean |D(s) − D(r)| over frames,
pixels and channels: 0 when the student's clip changes from frame to frame exactly as the teacher's does, whatever
constant offset it has. The motion ratio mean |D(s)| / mean |D(r)| says which way it errs: above 1 flicker, below 1
frozen motion.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch

from deltaconv_core.analysis import video_locality_stats
from deltaconv_core.families import FAMILIES
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import DWC_KERNEL
from deltaconv_core.metrics import psnr, ssim

from .cost import Cost, Site
from .experiment import (
    DYNAMIC,
    ZERO,
    Evaluation,
    Log,
    distil,
    load_or_train_teacher,
    make_mediator_student,
    make_student,
    mean,
    mediator_label,
    params,
)
from .model import attention_blocks, denoise, karras_sigmas, percent_to_sigma, sample_euler
from .video import TinyVideoUNet, synthetic_clips, to_frames, video_grid

WAN = FAMILIES["wan"]  # the pack's video students are Wan's: its gate and taps over time
SCALES = (1.0, 0.5)
# name → ΔConv taps over time: the official 3-D block, and the per-frame ablation.
VARIANTS = {
    f"3-D ΔConv (time kernel {WAN.time_kernel}, scales 1, ½ + pool)": WAN.time_kernel,
    "ΔConv per frame (no conv over time, clip-wide pool)": 0,
}
OFFICIAL = next(iter(VARIANTS))


@dataclass
class VideoProxyConfig:
    width: int = 32
    size: int = 16  # frame size in pixels (tokens: size/2 per side at the finest sites)
    frames: int = 8
    objects: int = 2
    teacher_steps: int = 1500
    teacher_batch: int = 16
    teacher_lr: float = 2e-3
    ema: float = 0.998
    train_clips: int = 1024  # fixed clips the distiller draws from (fresh noise and σ every step)
    kernel_size: int = 0  # 0: per site, the suggested kernel of the teacher's measured spatial locality (at least 3)
    stage_a_steps: int = 200
    stage_b_steps: int = 500
    distill_batch: int = 8
    distill_lr: float = 1e-3
    eval_clips: int = 128
    eval_sigmas: tuple = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
    locality_sigma: float = 1.0
    locality_clips: int = 4
    samples: int = 16
    sample_steps: int = 20
    variants: tuple = tuple(VARIANTS)
    mediators: tuple = (DYNAMIC,)
    seed: int = 0

    def teacher_key(self) -> str:
        keys = ("width", "size", "frames", "objects", "teacher_steps", "teacher_batch", "teacher_lr", "ema", "seed")
        return "video-" + hashlib.sha1(json.dumps({k: getattr(self, k) for k in keys}).encode()).hexdigest()[:12]


VIDEO_PRESETS = {
    # Every student side by side at 1 thread: about 12 min of CPU time, teacher (8 min) included; 15 min of wall
    # time on a busy 2-core machine.
    "video_cpu": VideoProxyConfig(),
    # What tests/test_quality_proxy_video.py runs: well under a minute, checks invariants, not quality.
    "video_smoke": VideoProxyConfig(width=16, teacher_steps=100, teacher_batch=8, train_clips=64, stage_a_steps=40,
                                    stage_b_steps=8, distill_batch=4, eval_clips=16, eval_sigmas=(0.2, 1.0),
                                    locality_clips=1, samples=4, sample_steps=6, variants=(OFFICIAL,)),
}


@torch.no_grad()
def teacher_locality(unet: TinyVideoUNet, x0: torch.Tensor, sigma: float, seed: int) -> dict:
    """Per site: the teacher's attention locality in space and time (video_locality_stats) on held-out clips at one
    σ, every token of each clip a query; with the site's grid and channels."""
    inputs, hooks = {}, []
    for name, tb in attention_blocks(unet).items():
        def keep(module, args, kwargs, name=name):
            inputs[name] = (args[0], kwargs["transformer_options"]["activations_shape"])
        hooks.append(tb.attn1.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        g = torch.Generator().manual_seed(seed)
        denoise(unet, x0 + sigma * torch.randn(x0.shape, generator=g), torch.full((x0.shape[0],), sigma))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, tb in attention_blocks(unet).items():
        x, (_, _, t, h, w) = inputs[name]
        queries = torch.arange(t * h * w)
        tyx = torch.stack([queries // (h * w), queries // w % h, queries % w], dim=1)
        maps = [tb.attn1.probabilities(x[i:i + 1], queries) for i in range(x.shape[0])]
        out[name] = (video_locality_stats(torch.cat(maps), tyx.repeat(len(maps), 1), (t, h, w)), (t, h, w),
                     x.shape[-1])
    return out


def sample_metrics(samples: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Same-seed samples [B, T, H, W, 3] in [0, 1] against the teacher's: clip PSNR (the MSE over the whole clip),
    per-frame SSIM (both averaged over the clips), temporal error and motion ratio (module docstring) over all."""
    b, t, h, w, c = samples.shape
    change, teacher_change = samples.diff(dim=1), teacher.diff(dim=1)
    return {"psnr": float(psnr(samples.reshape(b, t * h, w, c), teacher.reshape(b, t * h, w, c)).clamp(max=100).mean()),
            "ssim": float(ssim(samples.flatten(0, 1), teacher.flatten(0, 1)).mean()),
            "temporal_error": float((change - teacher_change).abs().mean()),
            "motion_ratio": float(change.abs().mean() / teacher_change.abs().mean())}


def run(cfg: VideoProxyConfig, cache: str | None = None, log: Log | None = None) -> dict:
    log = log or Log()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train_clips = synthetic_clips(cfg.train_clips, cfg.frames, cfg.size, cfg.objects, g)
    eval_clips = synthetic_clips(cfg.eval_clips, cfg.frames, cfg.size, cfg.objects, g)  # held out: never trained on

    t0, cpu0 = time.perf_counter(), time.process_time()
    teacher, teacher_losses = load_or_train_teacher(
        cfg, lambda: TinyVideoUNet(cfg.width, frames=cfg.frames),
        lambda gen: synthetic_clips(cfg.teacher_batch, cfg.frames, cfg.size, cfg.objects, gen), cache, log)
    teacher_s, teacher_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0

    locality = teacher_locality(teacher, eval_clips[:cfg.locality_clips], cfg.locality_sigma, cfg.seed)
    kernels = {n: cfg.kernel_size or max(3, st.spatial.suggested_kernel) for n, (st, _, _) in locality.items()}
    sites = {n: {"grid": "x".join(map(str, grid)), "channels": c, "kernel": kernels[n],
                 "mass_in_kernel": st.spatial.mass_in_kernel(kernels[n]),
                 "mass_in_time_kernel": st.mass_in_time_kernel(WAN.time_kernel),
                 "mass_in_box": st.mass_in_box(kernels[n], WAN.time_kernel),
                 "uniform_fraction": st.spatial.uniform_fraction, "erf": st.spatial.erf, "time_erf": st.time_erf}
             for n, (st, grid, c) in locality.items()}
    for n, s in sites.items():
        log(f"teacher locality {n} ({s['grid']}): {s['mass_in_box']:.2f} of the attention within "
            f"{s['kernel']}×{s['kernel']}×{WAN.time_kernel}, {s['mass_in_time_kernel']:.2f} within ±1 frame, "
            f"uniform {s['uniform_fraction']:.2f}, ERF {s['erf']} px / {s['time_erf']} frames")

    noise = torch.randn(cfg.samples, 3, cfg.frames, cfg.size, cfg.size,
                        generator=torch.Generator().manual_seed(cfg.seed + 2))
    step_sigmas = [float(s) for s in karras_sigmas(cfg.sample_steps)[:-1]]
    cost_sites = [Site(tuple(map(int, s["grid"].split("x"))), s["channels"], s["kernel"]) for s in sites.values()]

    def sample(unet):
        return to_frames(sample_euler(lambda x, s: denoise(unet, x, s), noise, cfg.sample_steps))

    evaluate = Evaluation(cfg, eval_clips, cost_sites, step_sigmas, sample, sample_metrics, log)
    evaluate("teacher", "teacher", teacher, None, Cost("attention"))
    block = {"grid": video_grid, "gate": WAN.gate}
    zero = make_student(teacher, kernels, SCALES, True, zero=True, time_kernel=WAN.time_kernel, **block)
    evaluate(ZERO, "zero", zero[0], zero[1], Cost("zero"), zero[2])
    for label in cfg.variants:
        t0 = time.perf_counter()
        student = make_student(teacher, kernels, SCALES, True, time_kernel=VARIANTS[label], **block)
        unet, runtime, blocks, losses = distil(student, cfg, train_clips, log, label)
        evaluate(label, "deltaconv", unet, runtime, Cost("deltaconv", SCALES, time_kernel=VARIANTS[label]), blocks,
                 time_kernel=VARIANTS[label], losses=losses, distill_s=time.perf_counter() - t0,
                 block_params=params(blocks))
    for text in cfg.mediators:
        schedule, label = MediatorSchedule.parse(text), mediator_label(text)
        t0 = time.perf_counter()
        student = make_mediator_student(teacher, schedule, grid=video_grid, video=True)
        unet, runtime, students, losses = distil(student, cfg, train_clips, log, label, schedule)
        counts = schedule.resolve(percent_to_sigma)
        evaluate(label, "mediators", unet, runtime, Cost("mediators", counts=counts, time_kernel=DWC_KERNEL), students,
                 schedule=schedule.format(), losses=losses, distill_s=time.perf_counter() - t0,
                 block_params=params(students))
    evaluate.ratios()
    teacher_change = evaluate.images["teacher"].diff(dim=1).abs().mean()
    attention_params = sum(p.numel() for tb in attention_blocks(teacher).values() for p in tb.attn1.parameters())
    return {"config": {**asdict(cfg), "variants": list(cfg.variants), "mediators": list(cfg.mediators)},
            "sites": sites, "models": evaluate.models, "teacher_motion": float(teacher_change),
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "attention_params": attention_params,
            "teacher_loss_start": mean(teacher_losses[:20]), "teacher_loss_end": mean(teacher_losses[-50:]),
            "teacher_s": teacher_s, "teacher_cpu_s": teacher_cpu_s, "total_s": time.perf_counter() - t_start,
            "cpu_s": time.process_time() - cpu_start, "log": log.lines,
            "_images": evaluate.images}
