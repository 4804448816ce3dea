"""The quality proxy experiment: train a teacher, measure its attention locality, distil ΔConv and mediator
students (stage A then stage B, with the pack's own Distiller and wrappers), and compare them with the teacher.

Every student starts from the same teacher and the same seeds with the same training budget, so the students differ
only in what replaces attention. Hybrids are evaluation-only: the trained official ΔConv student with the wrappers'
σ range ending part-way through sampling, after which the original attention runs.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from deltaconv_core.analysis import locality_stats
from deltaconv_core.attention import PatchRuntime, StudentSelfAttention
from deltaconv_core.block import BlockConfig
from deltaconv_core.distill import DistillConfig, Distiller, MediatorTraining
from deltaconv_core.families import FAMILIES
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import MediatorAttention
from deltaconv_core.metrics import psnr, ssim
from deltaconv_core.students import DELTACONV, MEDIATORS, build_student

from . import data
from .cost import Cost, Site
from .model import TinyUNet, attention_blocks, denoise, edm_loss, karras_sigmas, percent_to_sigma, sample_euler

# The proxy's UNet passes transformer_options as ComfyUI's UNets do: the UNet adapter's token grid reads them.
GRID = functools.partial(FAMILIES["sd1"].token_grid, None)

# name → (scales, global pooling branch): the official block and the paper's ablations.
VARIANTS = {
    "ΔConv (scales 1, ½ + pool)": ((1.0, 0.5), True),
    "without pool branch": ((1.0, 0.5), False),
    "1 scale": ((1.0,), True),
    "3 scales (1, ½, ¼)": ((1.0, 0.5, 0.25), True),
}
OFFICIAL = "ΔConv (scales 1, ½ + pool)"  # the variant the hybrids reuse
ZERO = "zero block (attention removed)"
DYNAMIC = "0.0:4,0.5:16,0.8:64"  # mediators.DEFAULT_SCHEDULE: few mediators at high noise, more later


def mediator_label(schedule: str) -> str:
    parsed = MediatorSchedule.parse(schedule)
    if len(parsed.counts) == 1:
        return f"mediators n={parsed.counts[0]}"
    return "mediators dynamic " + "→".join(map(str, parsed.counts)) + f" ({schedule})"


def hybrid_label(fraction: float, steps: int) -> str:
    return f"hybrid: ΔConv for {hybrid_steps(fraction, steps)}/{steps} steps, then attention"


def hybrid_steps(fraction: float, steps: int) -> int:
    return round(fraction * steps)


@dataclass
class ProxyConfig:
    width: int = 32
    photo_short_side: int = 96
    crop: int = 32
    teacher_steps: int = 3000
    teacher_batch: int = 32
    teacher_lr: float = 2e-3
    ema: float = 0.999
    train_crops: int = 4096  # fixed crops the distiller draws from (fresh noise and σ every step)
    kernel_size: int = 0  # 0: per site, the suggested kernel of the teacher's measured locality (at least 3)
    stage_a_steps: int = 400
    stage_b_steps: int = 1000
    distill_batch: int = 16
    distill_lr: float = 1e-3
    eval_crops: int = 256
    eval_sigmas: tuple = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
    locality_sigma: float = 1.0
    samples: int = 32
    sample_steps: int = 24
    variants: tuple = tuple(VARIANTS)
    mediators: tuple = ("4", "16", "64", DYNAMIC)  # schedules (mediator_schedule text form) of the mediator students
    hybrids: tuple = (0.8, 0.9)  # fractions of the sampling steps that the official ΔConv student runs
    seed: int = 0

    def teacher_key(self) -> str:
        keys = ("width", "photo_short_side", "crop", "teacher_steps", "teacher_batch", "teacher_lr", "ema", "seed")
        return hashlib.sha1(json.dumps({k: getattr(self, k) for k in keys}).encode()).hexdigest()[:12]


PRESETS = {
    "cpu": ProxyConfig(),  # ~20 min on 1 core for the teacher (cached after), ~4 min per student
    # The cpu preset's model and data on a smaller budget (teacher 1/6, students 1/4 of the steps at half the
    # batch): every student side by side on a busy 2-core machine at 1 thread in 10 min (teacher) + 14 min.
    "small": ProxyConfig(teacher_steps=500, teacher_batch=16, train_crops=1024, stage_a_steps=100, stage_b_steps=250,
                         distill_batch=8, eval_crops=128, samples=16, sample_steps=20),
    # What the test suite runs (tests/test_quality_proxy.py): about a minute, checks invariants, not quality.
    "smoke": ProxyConfig(width=16, teacher_steps=120, teacher_batch=8, train_crops=64, stage_a_steps=40,
                         stage_b_steps=8, distill_batch=4, eval_crops=16, samples=4, sample_steps=6,
                         eval_sigmas=(0.2, 1.0), variants=(OFFICIAL,), mediators=(DYNAMIC,), hybrids=(0.8,)),
}


@dataclass
class Log:
    lines: list = field(default_factory=list)

    def __call__(self, msg: str):
        print(msg, flush=True)
        self.lines.append(msg)


# ------------------------------------------------------------------------------------------------------- teacher
def train_teacher(cfg, build, draw, log: Log) -> tuple[nn.Module, list[float]]:
    """EDM training of `build()` (made after seeding) on batches `draw(generator)`, with an EMA copy returned; `cfg`
    gives seed, teacher_steps, teacher_lr and ema (ProxyConfig, or the video proxy's config)."""
    torch.manual_seed(cfg.seed)
    unet = build()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.teacher_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.teacher_steps):
        for group in opt.param_groups:  # short warm-up, then cosine decay to 0
            group["lr"] = cfg.teacher_lr * min(1.0, (step + 1) / 100) * 0.5 * (
                1 + math.cos(math.pi * step / cfg.teacher_steps))
        loss = edm_loss(unet, draw(g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (step + 1) / (step + 10))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, cfg.teacher_steps // 10) == 0:
            log(f"teacher step {step + 1}/{cfg.teacher_steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema.eval(), losses


def load_or_train_teacher(cfg, build, draw, cache: str | None, log: Log):
    """train_teacher's result, cached in `cache` under the config's teacher_key()."""
    path = cache and os.path.join(cache, f"teacher-{cfg.teacher_key()}.pt")
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        unet = build()
        unet.load_state_dict(saved["state_dict"])
        log(f"teacher: cached {path}")
        return unet.eval(), saved["losses"].tolist()
    unet, losses = train_teacher(cfg, build, draw, log)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save({"state_dict": unet.state_dict(), "losses": torch.tensor(losses)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return unet, losses


# ------------------------------------------------------------------------------------------------------ locality
@torch.no_grad()
def teacher_locality(unet: TinyUNet, x0: torch.Tensor, sigma: float, seed: int) -> dict:
    """Per site: the locality statistics of the teacher's self-attention on held-out crops at one σ."""
    inputs, hooks = {}, []
    for name, tb in attention_blocks(unet).items():
        def keep(module, args, kwargs, name=name):
            inputs[name] = (args[0], kwargs["transformer_options"]["activations_shape"])
        hooks.append(tb.attn1.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        g = torch.Generator().manual_seed(seed)
        s = torch.full((x0.shape[0],), sigma)
        denoise(unet, x0 + sigma * torch.randn(x0.shape, generator=g), s)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, tb in attention_blocks(unet).items():
        x, (_, _, h, w) = inputs[name]
        queries = torch.arange(h * w)
        yx = torch.stack([queries // w, queries % w], dim=1)
        maps = [tb.attn1.probabilities(x[i:i + 1], queries) for i in range(x.shape[0])]
        out[name] = (locality_stats(torch.cat(maps), yx.repeat(len(maps), 1), (h, w)), (h, w), x.shape[-1])
    return out


# ------------------------------------------------------------------------------------------------------ students
def make_student(teacher: TinyUNet, kernels: dict[str, int], scales, pool: bool, zero: bool = False, *, grid=GRID,
                 **config):
    """A copy of the teacher with every attn1 wrapped by a ΔConvBlock; returns (unet, runtime, blocks, taps).
    `grid`: the wrappers' token grid of a call (video: the t×h×w one); `config`: further BlockConfig fields (video
    students: gate, time_kernel)."""
    unet = copy.deepcopy(teacher).requires_grad_(False)
    runtime, blocks, taps = PatchRuntime(), {}, {}
    for name, tb in attention_blocks(unet).items():
        dim = tb.attn1.to_q.in_features
        block = build_student(BlockConfig(dim, kernels[name], tuple(scales), **config))
        if zero:  # the "attention removed" baseline: the block outputs exactly 0
            for p in block.parameters():
                p.data.zero_()
        if not pool:  # ablation: no global branch (conv_pool's bias merges with conv_out's, so only the weight goes)
            block.conv_pool.weight.data.zero_()
            block.conv_pool.weight.requires_grad_(False)
        tb.attn1 = StudentSelfAttention(tb.attn1, block, runtime, name, grid=grid)
        blocks[name], taps[name] = block, tb.norm2
    return unet, runtime, blocks, taps


def sigma_table(cfg: ProxyConfig) -> torch.Tensor:
    """Training σ for distillation: the teacher's log-normal (as quantiles) plus the sampler's own σ."""
    q = torch.linspace(0.005, 0.995, 200)
    lognormal = torch.exp(-1.2 + 1.2 * math.sqrt(2) * torch.erfinv(2 * q - 1))
    return torch.cat([lognormal, karras_sigmas(cfg.sample_steps)[:-1]])


def make_mediator_student(teacher: TinyUNet, schedule: MediatorSchedule, *, grid=GRID, video: bool = False):
    """A copy of the teacher with every attn1 wrapped by a MediatorAttention initialised from it (its projections,
    a zero DWC; `video`: per frame and over time), counts following `schedule` on this model's σ; returns (unet,
    runtime, students, taps). `grid` as make_student's."""
    unet = copy.deepcopy(teacher).requires_grad_(False)
    runtime, students, taps = PatchRuntime(), {}, {}
    for name, tb in attention_blocks(unet).items():
        student = MediatorAttention.from_teacher(tb.attn1, schedule, video=video)
        tb.attn1 = StudentSelfAttention(tb.attn1, student, runtime, name, schedule.resolve(percent_to_sigma),
                                        grid=grid)
        students[name], taps[name] = student, tb.norm2
    return unet, runtime, students, taps


def distil(student, cfg: ProxyConfig, crops, log: Log, label: str, schedule: MediatorSchedule | None = None):
    """Stage A then stage B on a student from make_student / make_mediator_student (with its `schedule`), in
    place. Mediator students train each count of their schedule in turn, at the σ where sampling runs it."""
    unet, runtime, blocks, taps = student
    sigmas = sigma_table(cfg)
    mediators = None if schedule is None else MediatorTraining(schedule, schedule.resolve(percent_to_sigma))
    losses = {}
    for stage, steps in (("A", cfg.stage_a_steps), ("B", cfg.stage_b_steps)):
        if steps == 0:
            continue
        dc = DistillConfig(stage=stage, steps=steps, learning_rate=cfg.distill_lr, warmup_steps=min(50, steps // 5),
                           batch_size=cfg.distill_batch, seed=cfg.seed, caption_drop=0.0)
        distiller = Distiller(lambda x_t, s, neg, idx: denoise(unet, x_t, s), runtime.teacher, blocks, crops, sigmas,
                              dc, taps=taps if stage == "B" else None, mediators=mediators)
        try:
            losses[stage] = [distiller.step() for _ in range(steps)]
        finally:
            distiller.close()
        log(f"{label} stage {stage}: loss {mean(losses[stage][:10]):.4g} → {mean(losses[stage][-10:]):.4g}")
    return unet.eval(), runtime, blocks, losses


# ---------------------------------------------------------------------------------------------------- evaluation
def mean(xs) -> float:
    return sum(xs) / len(xs)


def params(students: dict) -> int:
    return sum(p.numel() for b in students.values() for p in b.parameters())


def expected_calls(cost: Cost, n_sites: int, step_sigmas) -> dict[str, int]:
    """The wrappers' call counts (PatchRuntime.counts keys) that one sampling run with this cost makes."""
    calls = {}
    for sigma in step_sigmas:
        if sigma < cost.sigma_end:
            key = "attention:sigma"
        else:
            key = DELTACONV if cost.student in ("deltaconv", "zero") else f"{MEDIATORS}:{cost.counts(sigma)}"
        calls[key] = calls.get(key, 0) + n_sites
    return calls


@torch.no_grad()
def denoising_mse(unet, x0: torch.Tensor, sigmas, seed: int) -> list[float]:
    """MSE(x̂_0, x_0) per σ on the held-out crops, the same noise for every model."""
    out = []
    for i, sigma in enumerate(sigmas):
        g = torch.Generator().manual_seed(seed + i)
        x_t = x0 + sigma * torch.randn(x0.shape, generator=g)
        pred = torch.cat([denoise(unet, c, torch.full((c.shape[0],), float(sigma))) for c in x_t.split(64)])
        out.append(float(((pred - x0) ** 2).mean()))
    return out


@dataclass
class Evaluation:
    """Evaluates models against the teacher (the first one evaluated), for the image and the video experiment:
    denoising MSE on the held-out data, cost, and, for students, same-seed samples scored by `metrics(samples,
    teacher's)`. While a student samples, its wrappers must count exactly the calls its cost assumes: a fallback or
    a wrong mediator count is an error, not a number."""
    cfg: object  # eval_sigmas, seed
    held_out: torch.Tensor
    cost_sites: list
    step_sigmas: list
    sample: object  # unet → samples
    metrics: object  # (samples, teacher's) → {name: value}
    log: Log
    models: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    def __call__(self, label: str, kind: str, unet, runtime, cost: Cost, students: dict | None = None, **extra):
        """`students`: modules whose input grids are recorded while sampling (student_grids)."""
        m = {"kind": kind, "mse": denoising_mse(unet, self.held_out, self.cfg.eval_sigmas, self.cfg.seed),
             "macs_per_run": cost.run_macs(self.cost_sites, self.step_sigmas), **extra}
        if runtime is None:
            self.images[label] = self.sample(unet)
        else:
            runtime.counts.clear()
            grids, hooks = student_grids(students or {})
            try:
                self.images[label] = self.sample(unet)
            finally:
                for h in hooks:
                    h.remove()
            expected = expected_calls(cost, len(self.cost_sites), self.step_sigmas)
            if dict(runtime.counts) != expected:
                raise RuntimeError(f"{label}: the wrappers ran {dict(runtime.counts)}, expected {expected}")
            m.update(self.metrics(self.images[label], self.images["teacher"]),
                     calls={k: v // len(self.cost_sites) for k, v in sorted(expected.items())})
            if students is not None:
                m["student_grids"] = sorted(grids)
        self.models[label] = m
        ratio = mean([a / b for a, b in zip(m["mse"], self.models["teacher"]["mse"], strict=True)])
        self.log(f"{label}: MSE ratio {ratio:.3f}, {m['macs_per_run'] / 1e6:.1f} M attention-site MACs per sampling "
                 "run" + (f", PSNR {m['psnr']:.2f} dB" if "psnr" in m else ""))

    def ratios(self):
        """Every model's MSE per σ over the teacher's, and their mean."""
        teacher_mse = self.models["teacher"]["mse"]
        for m in self.models.values():
            m["mse_ratio"] = [a / b for a, b in zip(m["mse"], teacher_mse)]
            m["mse_ratio_mean"] = mean(m["mse_ratio"])


def student_grids(students: dict) -> tuple[set, list]:
    """Forward pre-hooks recording the grids ([B, *grid, C] inputs) the students run on: (grids, hooks)."""
    grids, hooks = set(), []
    for student in students.values():
        hooks.append(student.register_forward_pre_hook(lambda m, args: grids.add(tuple(args[0].shape[1:-1]))))
    return grids, hooks


def image_metrics(samples: torch.Tensor, teacher: torch.Tensor) -> dict:
    return {"psnr": float(psnr(samples, teacher).clamp(max=100).mean()), "ssim": float(ssim(samples, teacher).mean())}


def to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout)."""
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def run(cfg: ProxyConfig, cache: str | None = None, log: Log | None = None) -> dict:
    log = log or Log()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    photos = data.load_photos(data.TRAIN_PHOTOS, cfg.photo_short_side)
    held_out = data.load_photos(data.HELD_OUT_PHOTOS, cfg.photo_short_side)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train_crops = data.random_crops(photos, cfg.train_crops, cfg.crop, g)
    eval_crops = data.random_crops(held_out, cfg.eval_crops, cfg.crop, g)

    t0 = time.perf_counter()
    teacher, teacher_losses = load_or_train_teacher(
        cfg, lambda: TinyUNet(cfg.width), lambda g: data.random_crops(photos, cfg.teacher_batch, cfg.crop, g), cache,
        log)
    teacher_s = time.perf_counter() - t0

    locality = teacher_locality(teacher, eval_crops[:8], cfg.locality_sigma, cfg.seed)
    kernels = {n: cfg.kernel_size or max(3, st.suggested_kernel) for n, (st, _, _) in locality.items()}
    sites = {n: {"grid": f"{hw[0]}x{hw[1]}", "channels": c, "kernel": kernels[n],
                 "mass_in_kernel": st.mass_in_kernel(kernels[n]), "uniform_fraction": st.uniform_fraction,
                 "erf": st.erf, "suggested_kernel": st.suggested_kernel}
             for n, (st, hw, c) in locality.items()}
    for n, s in sites.items():
        log(f"teacher locality {n} ({s['grid']}): {s['mass_in_kernel']:.2f} of the attention within "
            f"{s['kernel']}×{s['kernel']}, uniform {s['uniform_fraction']:.2f}, ERF {s['erf']}")

    noise = torch.randn(cfg.samples, 3, cfg.crop, cfg.crop, generator=torch.Generator().manual_seed(cfg.seed + 2))
    step_sigmas = [float(s) for s in karras_sigmas(cfg.sample_steps)[:-1]]
    cost_sites = [Site(tuple(map(int, s["grid"].split("x"))), s["channels"], s["kernel"]) for s in sites.values()]

    def sample(unet):
        return to_image(sample_euler(lambda x, s: denoise(unet, x, s), noise, cfg.sample_steps))

    evaluate = Evaluation(cfg, eval_crops, cost_sites, step_sigmas, sample, image_metrics, log)
    evaluate("teacher", "teacher", teacher, None, Cost("attention"))
    zero = make_student(teacher, kernels, (1.0, 0.5), True, zero=True)
    evaluate(ZERO, "zero", zero[0], zero[1], Cost("zero"))
    official = None
    for label in cfg.variants:
        scales, pool = VARIANTS[label]
        t0 = time.perf_counter()
        unet, runtime, blocks, losses = distil(make_student(teacher, kernels, scales, pool), cfg, train_crops, log,
                                               label)
        evaluate(label, "deltaconv", unet, runtime, Cost("deltaconv", tuple(scales)), losses=losses,
                 distill_s=time.perf_counter() - t0, block_params=params(blocks))
        if label == OFFICIAL:
            official = (unet, runtime, blocks)
    for fraction in cfg.hybrids if official else ():
        unet, runtime, blocks = official
        k = hybrid_steps(fraction, cfg.sample_steps)  # the student's steps; the threshold lies between two steps
        runtime.sigma_end = math.sqrt(step_sigmas[k - 1] * step_sigmas[k]) if k < cfg.sample_steps else 0.0
        try:
            evaluate(hybrid_label(fraction, cfg.sample_steps), "hybrid", unet, runtime,
                     Cost("deltaconv", VARIANTS[OFFICIAL][0], sigma_end=runtime.sigma_end),
                     sigma_end=runtime.sigma_end, block_params=params(blocks))
        finally:
            runtime.sigma_end = 0.0
    for text in cfg.mediators:
        schedule, label = MediatorSchedule.parse(text), mediator_label(text)
        t0 = time.perf_counter()
        unet, runtime, students, losses = distil(make_mediator_student(teacher, schedule), cfg, train_crops, log,
                                                 label, schedule)
        evaluate(label, "mediators", unet, runtime, Cost("mediators", counts=schedule.resolve(percent_to_sigma)),
                 schedule=schedule.format(), losses=losses, distill_s=time.perf_counter() - t0,
                 block_params=params(students))
    evaluate.ratios()
    attention_params = sum(p.numel() for tb in attention_blocks(teacher).values() for p in tb.attn1.parameters())
    return {"config": {**asdict(cfg), "variants": list(cfg.variants)}, "sites": sites, "models": evaluate.models,
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "attention_params": attention_params,
            "teacher_loss_start": mean(teacher_losses[:20]), "teacher_loss_end": mean(teacher_losses[-50:]),
            "teacher_s": teacher_s, "total_s": time.perf_counter() - t_start, "log": log.lines,
            "_images": evaluate.images, "_locality": locality}
