"""Quality proxy: how close do distilled students get to their teacher? (No Stable Diffusion weights here.)

    python bench/bench_quality_proxy.py [--preset cpu|small|smoke] [--threads 2] [--out bench/results]

Trains a small pixel-space diffusion UNet with self-attention on crops of scikit-image's sample photos (the wheel is
downloaded once into .cache/proxy, not installed), measures its attention locality, distils the official ΔConvBlock
and the paper's ablations (no pool branch; 1 and 3 scales) and mediator-attention students (fixed counts and a
dynamic schedule) with stage A then stage B, evaluates hybrids (the ΔConv student for the first 80 % / 90 % of the
sampling steps, then attention), and compares each with the teacher: held-out denoising MSE across σ, same-seed
sample PSNR/SSIM and the self-attention sites' MACs per sampling run. Presets: cpu (the full budget), small (every
student on a smaller budget, ~25 min on a busy 2-core machine), smoke (the tests'). The teacher is cached by its
config, so re-runs only redo the students. Results: bench/results/quality_proxy_<preset>_<device>.{json,md,*.png}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
import torch
from device_info import device_name, device_slug

from devkit.comfy_env import import_core

import_core()  # deltaconv_core without the repository root (and its nodes/) on sys.path
from quality_proxy import report  # noqa: E402
from quality_proxy.data import CACHE  # noqa: E402
from quality_proxy.experiment import PRESETS, run  # noqa: E402

BENCH = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--no-cache", action="store_true", help="retrain the teacher even if a cached one matches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(PRESETS[args.preset], cache=None if args.no_cache else CACHE)
    cpu = device_name("cpu")
    device = f"CPU {cpu}, {args.threads} thread{'s' if args.threads > 1 else ''}, torch {torch.__version__}"
    slug = f"{args.preset}_{device_slug('cpu')}"
    command = f"python bench/bench_quality_proxy.py --preset {args.preset} --threads {args.threads}"
    for path in report.save(result, args.out, slug, device, command):
        print(path)


if __name__ == "__main__":
    main()
