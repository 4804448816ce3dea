"""The quality proxy experiment: train a teacher, measure its attention locality, distil ΔConv students
(stage A then stage B, with the pack's own Distiller and wrappers), and compare them with the teacher.

Every student variant starts from the same teacher and the same seeds, so the ablations differ only in the block.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from deltaconv_core.analysis import locality_stats
from deltaconv_core.attention import DeltaConvSelfAttention, PatchRuntime
from deltaconv_core.block import BlockConfig, build_block
from deltaconv_core.distill import DistillConfig, Distiller
from deltaconv_core.metrics import psnr, ssim

from . import data
from .model import TinyUNet, attention_blocks, denoise, edm_loss, karras_sigmas, sample_euler

# name → (scales, global pooling branch): the official block and the paper's ablations.
VARIANTS = {
    "ΔConv (scales 1, ½ + pool)": ((1.0, 0.5), True),
    "without pool branch": ((1.0, 0.5), False),
    "1 scale": ((1.0,), True),
    "3 scales (1, ½, ¼)": ((1.0, 0.5, 0.25), True),
}


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
    seed: int = 0

    def teacher_key(self) -> str:
        keys = ("width", "photo_short_side", "crop", "teacher_steps", "teacher_batch", "teacher_lr", "ema", "seed")
        return hashlib.sha1(json.dumps({k: getattr(self, k) for k in keys}).encode()).hexdigest()[:12]


PRESETS = {
    "cpu": ProxyConfig(),  # ~20 min on 1 core for the teacher (cached after), ~4 min per student
    # What the test suite runs (tests/test_quality_proxy.py): about a minute, checks invariants, not quality.
    "smoke": ProxyConfig(width=16, teacher_steps=120, teacher_batch=8, train_crops=64, stage_a_steps=40,
                         stage_b_steps=8, distill_batch=4, eval_crops=16, samples=4, sample_steps=6,
                         eval_sigmas=(0.2, 1.0), variants=("ΔConv (scales 1, ½ + pool)",)),
}


@dataclass
class Log:
    lines: list = field(default_factory=list)

    def __call__(self, msg: str):
        print(msg, flush=True)
        self.lines.append(msg)


# ------------------------------------------------------------------------------------------------------- teacher
def train_teacher(cfg: ProxyConfig, photos, log: Log) -> tuple[TinyUNet, list[float]]:
    torch.manual_seed(cfg.seed)
    unet = TinyUNet(cfg.width)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.teacher_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.teacher_steps):
        for group in opt.param_groups:  # short warm-up, then cosine decay to 0
            group["lr"] = cfg.teacher_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.teacher_steps))
        loss = edm_loss(unet, data.random_crops(photos, cfg.teacher_batch, cfg.crop, g), g)
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


def load_or_train_teacher(cfg: ProxyConfig, photos, cache: str | None, log: Log):
    path = cache and os.path.join(cache, f"teacher-{cfg.teacher_key()}.pt")
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        unet = TinyUNet(cfg.width)
        unet.load_state_dict(saved["state_dict"])
        log(f"teacher: cached {path}")
        return unet.eval(), saved["losses"].tolist()
    unet, losses = train_teacher(cfg, photos, log)
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
def make_student(teacher: TinyUNet, kernels: dict[str, int], scales, pool: bool, zero: bool = False):
    """A copy of the teacher with every attn1 wrapped by a ΔConvBlock; returns (unet, runtime, blocks, taps)."""
    unet = copy.deepcopy(teacher).requires_grad_(False)
    runtime, blocks, taps = PatchRuntime(), {}, {}
    for name, tb in attention_blocks(unet).items():
        dim = tb.attn1.to_q.in_features
        block = build_block(BlockConfig(dim, kernels[name], tuple(scales)))
        if zero:  # the "attention removed" baseline: the block outputs exactly 0
            for p in block.parameters():
                p.data.zero_()
        if not pool:  # ablation: no global branch (conv_pool's bias merges with conv_out's, so only the weight goes)
            block.conv_pool.weight.data.zero_()
            block.conv_pool.weight.requires_grad_(False)
        tb.attn1 = DeltaConvSelfAttention(tb.attn1, block, runtime, name)
        blocks[name], taps[name] = block, tb.norm2
    return unet, runtime, blocks, taps


def sigma_table(cfg: ProxyConfig) -> torch.Tensor:
    """Training σ for distillation: the teacher's log-normal (as quantiles) plus the sampler's own σ."""
    q = torch.linspace(0.005, 0.995, 200)
    lognormal = torch.exp(-1.2 + 1.2 * math.sqrt(2) * torch.erfinv(2 * q - 1))
    return torch.cat([lognormal, karras_sigmas(cfg.sample_steps)[:-1]])


def distil(teacher, cfg: ProxyConfig, kernels, scales, pool, crops, log: Log, label: str):
    unet, runtime, blocks, taps = make_student(teacher, kernels, scales, pool)
    sigmas = sigma_table(cfg)
    losses = {}
    for stage, steps in (("A", cfg.stage_a_steps), ("B", cfg.stage_b_steps)):
        if steps == 0:
            continue
        dc = DistillConfig(stage=stage, steps=steps, learning_rate=cfg.distill_lr, warmup_steps=min(50, steps // 5),
                           batch_size=cfg.distill_batch, seed=cfg.seed, caption_drop=0.0)
        distiller = Distiller(lambda x_t, s, neg, idx: denoise(unet, x_t, s), runtime, blocks, crops, sigmas, dc,
                              taps=taps if stage == "B" else None)
        try:
            losses[stage] = [distiller.step() for _ in range(steps)]
        finally:
            distiller.close()
        log(f"{label} stage {stage}: loss {mean(losses[stage][:10]):.4g} → {mean(losses[stage][-10:]):.4g}")
    return unet.eval(), runtime, blocks, losses


# ---------------------------------------------------------------------------------------------------- evaluation
def mean(xs) -> float:
    return sum(xs) / len(xs)


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
    teacher, teacher_losses = load_or_train_teacher(cfg, photos, cache, log)
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

    def sample(unet):
        return to_image(sample_euler(lambda x, s: denoise(unet, x, s), noise, cfg.sample_steps))

    teacher_samples = sample(teacher)
    models = {"teacher": {"mse": denoising_mse(teacher, eval_crops, cfg.eval_sigmas, cfg.seed)}}
    zero, _, _, _ = make_student(teacher, kernels, (1.0, 0.5), True, zero=True)
    models["zero block (attention removed)"] = {"mse": denoising_mse(zero, eval_crops, cfg.eval_sigmas, cfg.seed)}
    images = {"teacher": teacher_samples}
    for label in cfg.variants:
        scales, pool = VARIANTS[label]
        t0 = time.perf_counter()
        student, runtime, blocks, losses = distil(teacher, cfg, kernels, scales, pool, train_crops, log, label)
        distil_s = time.perf_counter() - t0
        runtime.counts.clear()
        student_samples = sample(student)
        if runtime.counts["delta"] == 0 or any(k.startswith("attention") for k in runtime.counts):
            raise RuntimeError(f"{label}: the student did not run its ΔConv blocks everywhere ({dict(runtime.counts)})")
        images[label] = student_samples
        models[label] = {"mse": denoising_mse(student, eval_crops, cfg.eval_sigmas, cfg.seed),
                         "psnr": float(psnr(student_samples, teacher_samples).clamp(max=100).mean()),
                         "ssim": float(ssim(student_samples, teacher_samples).mean()),
                         "losses": losses, "distill_s": distil_s,
                         "block_params": sum(p.numel() for b in blocks.values() for p in b.parameters())}
    zero_samples = sample(zero)
    models["zero block (attention removed)"].update(psnr=float(psnr(zero_samples, teacher_samples).clamp(max=100).mean()),
                                                     ssim=float(ssim(zero_samples, teacher_samples).mean()))
    teacher_mse = models["teacher"]["mse"]
    for m in models.values():
        m["mse_ratio"] = [a / b for a, b in zip(m["mse"], teacher_mse)]
        m["mse_ratio_mean"] = mean(m["mse_ratio"])
    attention_params = sum(p.numel() for tb in attention_blocks(teacher).values() for p in tb.attn1.parameters())
    return {"config": {**asdict(cfg), "variants": list(cfg.variants)}, "sites": sites, "models": models,
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "attention_params": attention_params,
            "teacher_loss_start": mean(teacher_losses[:20]), "teacher_loss_end": mean(teacher_losses[-50:]),
            "teacher_s": teacher_s, "total_s": time.perf_counter() - t_start, "log": log.lines,
            "_images": images, "_locality": locality}
