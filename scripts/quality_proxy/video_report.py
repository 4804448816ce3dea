"""The video quality proxy's results: JSON, a markdown report (the teacher's locality in space and time, every
student against the teacher side by side) and PNG figures (a strip of same-seed sample clips, frame by frame, and
the MSE ratio per σ), drawn with the image proxy's helpers (report.py)."""
from __future__ import annotations

import json
import os

import torch
from PIL import Image, ImageDraw

from deltaconv_core.metrics import colormap

from .report import _ascii, _png, line_plot
from .video_experiment import WAN


def samples_figure(images: dict[str, torch.Tensor], clips: int = 2, zoom: int = 4) -> Image.Image:
    """One row per model (teacher first): the frames of the first `clips` same-seed clips left to right (a gap
    between clips), each student followed by its |student − teacher| ×4 row."""
    frames, size = images["teacher"].shape[1], images["teacher"].shape[2] * zoom
    label_w, gap = 230, 8
    rows = []
    for label, batch in images.items():
        rows.append((label, batch[:clips]))
        if label != "teacher":
            diff = (batch[:clips] - images["teacher"][:clips]).abs().mean(dim=-1)
            rows.append(("  |diff| vs teacher x4", colormap((4 * diff).clamp(0, 1))))
    clip_w = frames * (size + 1) + gap
    canvas = Image.new("RGB", (label_w + clips * clip_w, len(rows) * (size + 2) + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(clips):
        draw.text((label_w + c * clip_w, 2), f"seed {c}: frames 0-{frames - 1}", fill="black")
    for r, (label, batch) in enumerate(rows):
        y = 16 + r * (size + 2)
        draw.text((4, y + size // 2 - 6), _ascii(label), fill="black")
        for c in range(min(clips, batch.shape[0])):
            for f in range(frames):
                tile = _png(batch[c, f]).resize((size, size), Image.NEAREST)
                canvas.paste(tile, (label_w + c * clip_w + f * (size + 1), y))
    return canvas


def mse_figure(models: dict, sigmas) -> Image.Image:
    """The MSE ratio per σ of the teacher and the trained students (the zero block, far above, is in the tables)."""
    series = {n: (sigmas, m["mse_ratio"]) for n, m in models.items() if m["kind"] != "zero"}
    return line_plot(series, "held-out denoising MSE / teacher's", "sigma", "ratio")


def markdown(result: dict, device: str, command: str, stem: str = "") -> str:
    cfg, models = result["config"], result["models"]
    sig, kt = cfg["eval_sigmas"], WAN.time_kernel
    cached = ", teacher cached" if result["teacher_s"] < 5 else ""
    lines = [f"# Video quality proxy (a proxy, not Wan): {device}", "",
             f"Command: `{command}`  ",
             f"Wall time {result['total_s'] / 60:.1f} min (teacher {result['teacher_s'] / 60:.1f} min{cached}), "
             "measured on a loaded host (other jobs shared its 2 cores): not a timing. CPU time of the process "
             f"{result['cpu_s'] / 60:.1f} min (teacher {result['teacher_cpu_s'] / 60:.1f} min): at 1 thread, about "
             "what an idle core takes.", "",
             f"Teacher: {result['teacher_params'] / 1e6:.2f} M-parameter pixel video UNet (EDM), frames processed "
             f"by 2-D convolutions one by one, so that frames meet only in its full 3-D self-attention over t×h×w "
             f"tokens at two levels ({len(result['sites'])} sites, {result['attention_params'] / 1e3:.0f} k attention "
             f"parameters); {cfg['teacher_steps']} steps × {cfg['teacher_batch']} synthetic clips of {cfg['frames']} "
             f"frames × {cfg['size']}×{cfg['size']} pixels ({cfg['objects']} striped shapes translating and rotating "
             "over panning gratings, fresh clips every step); held-out clips of other seeds for every evaluation. "
             f"Students: the pack's 3-D students with Wan's defaults (gate {WAN.gate}, {kt} taps over time), stage A "
             f"{cfg['stage_a_steps']} + stage B {cfg['stage_b_steps']} steps, batch {cfg['distill_batch']}, "
             f"{cfg['train_clips']} training clips, the pack's Distiller and StudentSelfAttention wrappers on the "
             "t×h×w grid.", "",
             f"## Teacher attention locality (held-out clips, σ = {cfg['locality_sigma']})", "",
             f"| site | grid t×h×w | channels | kernel used | mass within k×k (any frame) | mass within ±{kt // 2} "
             f"frame | mass within k×k×{kt} | uniform part | ERF (px) | ERF (frames) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in result["sites"].items():
        lines.append(f"| {n} | {s['grid']} | {s['channels']} | {s['kernel']} | {s['mass_in_kernel']:.2f} | "
                     f"{s['mass_in_time_kernel']:.2f} | {s['mass_in_box']:.2f} | {s['uniform_fraction']:.2f} | "
                     f"{s['erf']} | {s['time_erf']} |")
    lines += ["", "## Students vs teacher", "",
              f"Denoising MSE ratio = student MSE(x̂₀, x₀) / teacher's on {cfg['eval_clips']} held-out clips, mean over "
              f"σ ∈ {{{', '.join(f'{s:g}' for s in sig)}}}. Same-seed samples: {cfg['samples']} clips, deterministic "
              f"Euler, {cfg['sample_steps']} steps; PSNR over each whole clip, SSIM per frame, both against the "
              "teacher's sample of the same seed.", "",
              "Temporal error = mean |D(student) − D(teacher)| with D(x)_f = x_{f+1} − x_f the frame-to-frame change "
              "of a sample (pixels in [0, 1]): how differently the student's clip moves from the teacher's "
              f"(the teacher's own mean |D| is {result['teacher_motion']:.4f}). Motion ratio = mean |D(student)| / "
              "mean |D(teacher)|: above 1 flicker, below 1 frozen motion.", "",
              "Cost = multiply-accumulates of the self-attention sites over one sampling run of one clip (the rest of "
              "the UNet is the same for every model), mediators at their schedule's count per step; relative = over "
              "the teacher's. Student grids: the token grids the students ran on while sampling.", "",
              "| model | student params | MSE ratio (mean) | worst σ ratio | PSNR vs teacher (dB) | SSIM vs teacher | "
              "temporal error | motion ratio | attention-site MMAC per run | relative cost | student grids | "
              "distil time (s, loaded host) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    full = models["teacher"]["macs_per_run"]
    for name, m in models.items():
        if name == "teacher":
            continue
        grids = ", ".join("×".join(map(str, g)) for g in m.get("student_grids", [])) or "—"
        distil = f"{m['distill_s']:.0f}" if "distill_s" in m else "—"
        lines.append(f"| {name} | {m.get('block_params', 0) / 1e3:.1f} k | {m['mse_ratio_mean']:.3f} | "
                     f"{max(m['mse_ratio']):.3f} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['temporal_error']:.4f} | "
                     f"{m['motion_ratio']:.3f} | {m['macs_per_run'] / 1e6:.1f} | {m['macs_per_run'] / full:.3f}× | "
                     f"{grids} | {distil} |")
    lines += ["", "Per-σ MSE (teacher first):", "", "| model | " + " | ".join(f"σ={s:g}" for s in sig) + " |",
              "|---|" + "---|" * len(sig)]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in m["mse"]) + " |")
    if stem:
        lines += ["", "Same seeds, teacher and every student, frame by frame, with |student − teacher| ×4:", "",
                  f"![same-seed sample clips]({stem}_samples.png)", "",
                  "Denoising MSE ratio to the teacher per σ (trained students):", "",
                  f"![MSE ratio per σ]({stem}_mse.png)"]
    return "\n".join(lines) + "\n"


def save(result: dict, out_dir: str, slug: str, device: str, command: str) -> list[str]:
    """Writes quality_proxy_<slug>.{json,md}, _samples.png and _mse.png; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"quality_proxy_{slug}")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    with open(base + ".json", "w") as f:
        json.dump({"device": device, "command": command, **public}, f, indent=1, ensure_ascii=False)
    with open(base + ".md", "w") as f:
        f.write(markdown(result, device, command, os.path.basename(base)))
    samples_figure(result["_images"]).save(base + "_samples.png")
    mse_figure(result["models"], result["config"]["eval_sigmas"]).save(base + "_mse.png")
    return [base + s for s in (".json", ".md", "_samples.png", "_mse.png")]
