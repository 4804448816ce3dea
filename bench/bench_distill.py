"""Distillation throughput and peak memory, stage A and stage B, through the same code the node runs.

    COMFYUI_PATH=... .venv/bin/python bench/bench_distill.py --model tiny [--steps 20] [--batch-size 4] [--size 8]
    COMFYUI_PATH=... .venv/bin/python bench/bench_distill.py --model sd15-full --batch-size 16 --size 64 --dtype fp16

tiny: the tests' small SD1.5-architecture UNet (320 channels, 2 levels); sd15-full: a full-size SD1.5 UNet with
random weights (speed does not depend on the values). Results: bench/results/distill_<device>.{json,md}.
"""
import argparse
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "scripts"), os.path.join(REPO, "tests")]
from comfy_env import load_pack, setup_comfy  # noqa: E402


def build_model(name: str, device):
    """A ModelPatcher around a randomly initialised SD1.5-architecture UNet (speed does not depend on values)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from tiny_models import SD15_TINY, init_random

    config = dict(SD15_TINY) if name == "tiny" else {
        **SD15_TINY, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3}
    base = comfy.supported_models.SD15(config).get_model({})
    init_random(base.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "cpu")
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("tiny", "sd15-full"), default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args()
    import torch

    setup_comfy(os.environ["COMFYUI_PATH"], cpu=not torch.cuda.is_available())
    pack = load_pack()
    import comfy.model_management

    from deltaconv_core.distill import DistillConfig
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights

    device = comfy.model_management.get_torch_device()
    model = build_model(args.model, device)
    sites = find_attention_sites(model.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(max(args.batch_size, 8), 4, args.size, args.size, generator=g)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    rows = []
    for stage in ("A", "B"):
        timings = []
        config = DistillConfig(stage=stage, steps=args.warmup + args.steps, batch_size=args.batch_size,
                               warmup_steps=0, autocast_dtype={"fp32": "none"}.get(args.dtype, args.dtype))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        last = [time.perf_counter()]

        def on_step(step, loss, timings=timings, last=last):
            now = time.perf_counter()
            if step > args.warmup:
                timings.append(now - last[0])
            last[0] = now

        with torch.enable_grad():
            pack.nodes.distill_run.train_blocks(
                model, latents, positive, None, DeltaConvWeights.fresh(sites, 0), sites, config, config.steps, 0,
                os.path.join(REPO, ".cache", "bench_distill"), f"bench_{stage}", on_step=on_step)
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        timings.sort()
        rows.append({"stage": stage, "steps_per_s": 1 / timings[len(timings) // 2],
                     "samples_per_s": args.batch_size / timings[len(timings) // 2],
                     "peak_mib": peak, "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else
                     "process max RSS", "rss_before_mib": rss_before / 1024})
    meta = {"device": device_name(device), "torch": torch.__version__, "model": args.model,
            "params": sum(p.numel() for p in model.model.diffusion_model.parameters()), "batch_size": args.batch_size,
            "latent": args.size, "dtype": args.dtype, "steps_timed": args.steps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/bench_distill.py " + " ".join(sys.argv[1:])}
    slug = "".join(c if c.isalnum() else "-" for c in f"{device.type}-{args.model}-{meta['device']}".lower())[:80]
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
