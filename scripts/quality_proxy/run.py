"""Quality proxy: how close do distilled students get to their teacher? (No Stable Diffusion weights here.)

    python scripts/quality_proxy/run.py [--preset cpu|small|smoke|video_cpu|video_smoke] [--threads 2]
                                        [--out scripts/quality_proxy/results]

A research experiment, not a benchmark: it trains a small pixel-space diffusion UNet with self-attention on crops of
scikit-image's sample photos (the wheel is downloaded once into .cache/proxy, not installed), measures its attention
locality, distils the official ΔConvBlock and the paper's ablations (no pool branch; 1 and 3 scales) and
mediator-attention students (fixed counts and a dynamic schedule) with stage A then stage B, evaluates hybrids (the
ΔConv student for the first 80 % / 90 % of the sampling steps, then attention), and compares each with the teacher:
held-out denoising MSE across σ, same-seed sample PSNR/SSIM and the self-attention sites' MACs per sampling run.
Presets: cpu (the full budget), small (every student on a smaller budget, ~25 min on a busy 2-core machine), smoke
(the tests'). The video presets run the same experiment on clips (video_experiment.py): a video UNet with full
3-D self-attention trained on synthetic moving shapes, distilled into the pack's 3-D ΔConv and mediator students,
compared on denoising MSE, same-seed sample PSNR/SSIM and temporal consistency: video_cpu (the full budget, ~15 min
at 1 thread), video_smoke (the tests'). The teacher is cached by its config, so re-runs only redo the students.
Results: scripts/quality_proxy/results/quality_proxy_<preset>_<device>.{json,md,*.png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: scripts/ (devkit, this package) instead of this folder on sys.path
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from devkit.comfy_env import import_core
from devkit.device_info import busy_cpu_s, device_name, device_slug, foreign_load

import_core()  # deltaconv_core without the repository root (and its nodes/) on sys.path
from quality_proxy import report, video_report  # noqa: E402
from quality_proxy.data import CACHE  # noqa: E402
from quality_proxy.experiment import PRESETS, run  # noqa: E402
from quality_proxy.video_experiment import VIDEO_PRESETS  # noqa: E402
from quality_proxy.video_experiment import run as run_video  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(VIDEO_PRESETS), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-cache", action="store_true", help="retrain the teacher even if a cached one matches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = None if args.no_cache else CACHE
    busy, started = busy_cpu_s(), time.perf_counter()
    if args.preset in VIDEO_PRESETS:
        result, save = run_video(VIDEO_PRESETS[args.preset], cache=cache), video_report.save
    else:
        result, save = run(PRESETS[args.preset], cache=cache), report.save
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    # Quality figures do not depend on the load; its distillation times do (a loaded host is no timing).
    load = foreign_load(busy, time.perf_counter() - started)
    host = "host load unknown" if load is None else f"other processes used {load:.1f} % of all cores during the run"
    device = f"CPU {device_name('cpu')}, {threads}, torch {torch.__version__}; {host}"
    command = f"python scripts/quality_proxy/run.py --preset {args.preset} --threads {args.threads}" + (
        " --no-cache" if args.no_cache else "")
    for path in save(result, args.out, f"{args.preset}_{device_slug('cpu')}", device, command):
        print(path)


if __name__ == "__main__":
    main()
