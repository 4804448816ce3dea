"""Quality proxy: how close do distilled ΔConv students get to their teacher? (No Stable Diffusion weights here.)

    .venv/bin/python bench/bench_quality_proxy.py [--preset cpu|smoke] [--threads 2] [--out bench/results]

Trains a small pixel-space diffusion UNet with self-attention on crops of scikit-image's sample photos (the wheel is
downloaded once into .cache/proxy, not installed), measures its attention locality, distils the official ΔConvBlock
and the paper's ablations (no pool branch; 1 and 3 scales) with stage A then stage B, and compares each with the
teacher: held-out denoising MSE across σ and same-seed sample PSNR/SSIM. The teacher is cached by its config, so
re-runs only redo the students. Results: bench/results/quality_proxy_<device>.{json,md,*.png}.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # repository root (deltaconv_core) and bench/ (quality_proxy)
from quality_proxy import report  # noqa: E402
from quality_proxy.data import CACHE  # noqa: E402
from quality_proxy.experiment import ProxyConfig, run  # noqa: E402

PRESETS = {
    "cpu": ProxyConfig(),  # ~20 min on 1 core for the teacher (cached after), ~4 min per student
    # What the test suite runs (tests/test_quality_proxy.py): about a minute, checks invariants, not quality.
    "smoke": ProxyConfig(width=16, teacher_steps=120, teacher_batch=8, train_crops=64, stage_a_steps=40,
                         stage_b_steps=8, distill_batch=4, eval_crops=16, samples=4, sample_steps=6,
                         eval_sigmas=(0.2, 1.0), variants=("ΔConv (scales 1, ½ + pool)",)),
}


def device_name(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--no-cache", action="store_true", help="retrain the teacher even if a cached one matches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(PRESETS[args.preset], cache=None if args.no_cache else CACHE)
    device = device_name(args.threads)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{args.preset} {device.split(',')[0][4:]} {args.threads}t".lower()).strip("-")
    command = f"python bench/bench_quality_proxy.py --preset {args.preset} --threads {args.threads}"
    for path in report.save(result, args.out, slug, device, command):
        print(path)


if __name__ == "__main__":
    main()
