"""The quality proxy's results: JSON, a markdown table, and three PNG figures drawn with Pillow."""
from __future__ import annotations

import json
import math
import os

import torch
from PIL import Image, ImageDraw

from deltaconv_core.metrics import colormap

COLOURS = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ascii(label: str) -> str:
    """Pillow's built-in font has no Δ, ½, ¼ or ×."""
    for a, b in (("ΔConv", "dConv"), ("|Δ|", "|diff|"), ("½", "1/2"), ("¼", "1/4"), ("×", "x")):
        label = label.replace(a, b)
    return label


def _png(t: torch.Tensor) -> Image.Image:
    """[H, W, 3] in [0, 1] → RGB image."""
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().cpu().numpy())


def samples_figure(images: dict[str, torch.Tensor], n: int = 8, zoom: int = 3) -> Image.Image:
    """One row per model (teacher first), the same seeds in every column, plus |student − teacher| rows."""
    label_w, size = 190, images["teacher"].shape[1] * zoom
    rows = []
    for label, batch in images.items():
        rows.append((label, batch[:n]))
        if label != "teacher":
            diff = (batch[:n] - images["teacher"][:n]).abs().mean(dim=-1)
            rows.append(("  |Δ| vs teacher ×4", colormap((4 * diff).clamp(0, 1))))
    canvas = Image.new("RGB", (label_w + n * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, batch) in enumerate(rows):
        y = r * (size + 2)
        draw.text((4, y + size // 2 - 6), _ascii(label), fill="black")
        for c in range(min(n, batch.shape[0])):
            canvas.paste(_png(batch[c]).resize((size, size), Image.NEAREST), (label_w + c * (size + 2), y))
    return canvas


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str, x_label: str, y_label: str,
              log_x: bool = True, size=(720, 420)) -> Image.Image:
    """A minimal line chart: series name → (xs, ys)."""
    w, h = size
    left, right, top, bottom = 70, 200, 30, 50
    xs_all = [math.log10(x) if log_x else x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    canvas = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(canvas)
    px = lambda x: left + (w - left - right) * ((math.log10(x) if log_x else x) - x0) / ((x1 - x0) or 1.0)  # noqa: E731
    py = lambda y: h - bottom - (h - top - bottom) * (y - y0) / (y1 - y0)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.text((4, py(yv) - 6), f"{yv:.3g}", fill="black")
        d.line([left - 4, py(yv), left, py(yv)], fill="black")
    for xv in sorted({x for xs, _ in series.values() for x in xs}):
        d.text((px(xv) - 10, h - bottom + 6), f"{xv:g}", fill="black")
    d.text((w // 2 - 100, 8), title, fill="black")
    d.text((w // 2 - 40, h - 22), x_label, fill="black")
    d.text((4, top - 22), y_label, fill="black")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        d.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=colour, width=2)
        d.text((w - right + 10, top + 16 * i), _ascii(name), fill=colour)
    return canvas


def locality_figure(locality: dict, radius: int = 7, zoom: int = 12) -> Image.Image:
    """Each site's centroid-aligned mean attention map (±radius around the query), brightest = max."""
    tiles = []
    for name, (stats, hw, _) in locality.items():
        m = stats.aligned_map
        cy, cx = hw[0] - 1, hw[1] - 1
        crop = m[max(0, cy - radius):cy + radius + 1, max(0, cx - radius):cx + radius + 1]
        img = _png(colormap(crop / crop.max())).resize((crop.shape[1] * zoom, crop.shape[0] * zoom), Image.NEAREST)
        tiles.append((f"{name} {hw[0]}x{hw[1]}, ERF {stats.erf}", img))
    w = sum(t.width + 10 for _, t in tiles)
    h = max(t.height for _, t in tiles) + 20
    canvas = Image.new("RGB", (w, h), "white")
    d, x = ImageDraw.Draw(canvas), 0
    for label, t in tiles:
        d.text((x + 2, 2), label, fill="black")
        canvas.paste(t, (x, 20))
        x += t.width + 10
    return canvas


def markdown(result: dict, device: str, command: str) -> str:
    cfg, models = result["config"], result["models"]
    sig = cfg["eval_sigmas"]
    lines = [f"# Quality proxy (a proxy, not Stable Diffusion): {device}", "",
             f"Command: `{command}`  ", f"Total {result['total_s'] / 60:.1f} min (teacher {result['teacher_s'] / 60:.1f} min"
             f"{', cached' if result['teacher_s'] < 5 else ''}).", "",
             f"Teacher: {result['teacher_params'] / 1e6:.2f} M-parameter pixel UNet (EDM), self-attention at 16×16 and "
             f"8×8 ({len(result['sites'])} sites, {result['attention_params'] / 1e3:.0f} k attention parameters), "
             f"{cfg['teacher_steps']} steps × {cfg['teacher_batch']} crops of {cfg['crop']}×{cfg['crop']} from "
             "scikit-image's sample photos; held-out photos (chelsea, coffee) for every evaluation. "
             f"Students: stage A {cfg['stage_a_steps']} + stage B {cfg['stage_b_steps']} steps, batch "
             f"{cfg['distill_batch']}, the pack's Distiller and DeltaConvSelfAttention wrappers.", "",
             f"## Teacher attention locality (held-out crops, σ = {cfg['locality_sigma']})", "",
             "| site | grid | channels | kernel used | mass within kernel | uniform part | ERF | suggested kernel |",
             "|---|---|---|---|---|---|---|---|"]
    for n, s in result["sites"].items():
        lines.append(f"| {n} | {s['grid']} | {s['channels']} | {s['kernel']} | {s['mass_in_kernel']:.2f} | "
                     f"{s['uniform_fraction']:.2f} | {s['erf']} | {s['suggested_kernel']} |")
    lines += ["", "## Students vs teacher", "",
              f"Denoising MSE ratio = student MSE(x̂₀, x₀) / teacher's on {cfg['eval_crops']} held-out crops, mean over "
              f"σ ∈ {{{', '.join(f'{s:g}' for s in sig)}}} (target ≤ 1.05). Same-seed samples: {cfg['samples']} images, "
              f"deterministic Euler, {cfg['sample_steps']} steps, student vs teacher (target PSNR ≥ 28 dB).", "",
              "| model | block params | MSE ratio (mean) | worst σ ratio | PSNR vs teacher (dB) | SSIM vs teacher | distil time (s) |",
              "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        if name == "teacher":
            continue
        worst = max(m["mse_ratio"])
        lines.append(f"| {name} | {m.get('block_params', 0) / 1e3:.1f} k | {m['mse_ratio_mean']:.3f} | {worst:.3f} | "
                     f"{m['psnr']:.2f} | {m['ssim']:.3f} | {m.get('distill_s', 0):.0f} |")
    lines += ["", "Per-σ MSE (teacher first):", "", "| model | " + " | ".join(f"σ={s:g}" for s in sig) + " |",
              "|---|" + "---|" * len(sig)]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in m["mse"]) + " |")
    lines += ["", "Figures: `*_samples.png` (same seeds, |Δ| ×4), `*_mse.png` (MSE ratio vs σ), `*_locality.png` "
              "(teacher's centroid-aligned attention maps).", ""]
    return "\n".join(lines)


def save(result: dict, out_dir: str, slug: str, device: str, command: str) -> list[str]:
    """Writes quality_proxy_<slug>.{json,md} and three PNGs; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"quality_proxy_{slug}")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    with open(base + ".json", "w") as f:
        json.dump({"device": device, "command": command, **public}, f, indent=1, ensure_ascii=False)
    with open(base + ".md", "w") as f:
        f.write(markdown(result, device, command))
    samples_figure(result["_images"]).save(base + "_samples.png")
    sig = result["config"]["eval_sigmas"]
    series = {n: (sig, m["mse_ratio"]) for n, m in result["models"].items() if not n.startswith("zero")}
    line_plot(series, "held-out denoising MSE / teacher's", "sigma", "ratio").save(base + "_mse.png")
    locality_figure(result["_locality"]).save(base + "_locality.png")
    return [base + s for s in (".json", ".md", "_samples.png", "_mse.png", "_locality.png")]

