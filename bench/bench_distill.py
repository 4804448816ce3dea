"""Distillation throughput and peak memory, stage A and stage B, through the same code the node runs.

    python bench/bench_distill.py --model tiny [--steps 20] [--batch-size 4] [--size 8]
    python bench/bench_distill.py --model sd15-full --batch-size 16 --size 64 --dtype fp16

tiny: the tests' small SD1.5-architecture UNet (320 channels, 2 levels); sd15-full: a full-size SD1.5 UNet with
random weights (speed does not depend on the values). Results: bench/results/distill_<model>_<device>.{json,md}.
"""
import argparse
import json
import os
import resource
import sys
import time

from bench_unet import build, setup
from device_info import busy_cpu_s, device_name, device_slug

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"tiny": "tiny", "sd15-full": "sd15"}  # this script's names → bench_unet's builders


def measure_stage(pack, model, stage: str, batch_size: int, size: int, dtype: str, warmup: int, steps: int,
                  save_dir: str) -> dict:
    """`warmup` + `steps` distillation steps of one stage (A or B) on random latents; the median timed step gives
    steps/s and samples/s. Peak memory: CUDA max_memory_allocated, else the process's max RSS (never reset)."""
    import torch

    from deltaconv_core.distill import DistillConfig
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights

    device = model.load_device
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(max(batch_size, 8), 4, size, size, generator=g)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    config = DistillConfig(stage=stage, steps=warmup + steps, batch_size=batch_size, warmup_steps=0,
                           training_dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timings, last = [], [time.perf_counter()]

    def on_step(step, loss):
        now = time.perf_counter()
        if step > warmup:
            timings.append(now - last[0])
        last[0] = now

    with torch.enable_grad():
        start = DeltaConvWeights.fresh(find_attention_sites(model.model.diffusion_model), 0)
        pack.nodes.distill_run.train_blocks(model, latents, positive, None, start, config, save_dir, f"bench_{stage}",
                                            on_step=on_step)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    step_s = sorted(timings)[len(timings) // 2]
    return {"stage": stage, "steps_per_s": 1 / step_s, "samples_per_s": batch_size / step_s, "peak_mib": peak,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
            "rss_before_mib": rss_before / 1024}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args()
    import torch

    pack, device = setup(cpu=not torch.cuda.is_available())
    model, _ = build(MODELS[args.model], device, torch.float32)  # fp32 weights; --dtype is the autocast dtype
    busy_before, started = busy_cpu_s(), time.perf_counter()
    rows = [measure_stage(pack, model, stage, args.batch_size, args.size, args.dtype, args.warmup, args.steps,
                          os.path.join(REPO, ".cache", "bench_distill")) for stage in ("A", "B")]
    other = None if busy_before is None else busy_cpu_s() - busy_before
    meta = {"device": f"{device_name(device.type)} ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "model": args.model, "params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
            "batch_size": args.batch_size, "latent": args.size, "dtype": args.dtype, "steps_timed": args.steps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/bench_distill.py " + " ".join(sys.argv[1:]),
            "foreign load %": None if other is None else round(
                100 * other / ((time.perf_counter() - started) * os.cpu_count()), 1)}
    slug = f"{args.model}_{device_slug(device.type)}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"distill_{slug}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = ["| stage | steps/s | samples/s | peak memory (MiB) |", "|---|---|---|---|"]
    table += [f"| {r['stage']} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.2f} | {r['peak_mib']:.0f} "
              f"({r['peak_kind']}) |" for r in rows]
    header = [f"# ΔConv distillation speed: {args.model}", "", *(f"- {k}: {v}" for k, v in meta.items()), ""]
    with open(os.path.join(args.out, f"distill_{slug}.md"), "w") as f:
        f.write("\n".join(header + table) + "\n")
    print("\n".join(header + table))


if __name__ == "__main__":
    main()
