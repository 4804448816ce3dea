"""Distillation throughput and peak memory, stage A and stage B, through the same code the node runs.

    python bench/bench_distill.py --model tiny [--steps 20] [--batch-size 4] [--size 8]
    python bench/bench_distill.py --model sd15-full --batch-size 16 --size 64 --dtype fp16

tiny: the tests' small SD1.5-architecture UNet (320 channels, 2 levels); sd15-full: a full-size SD1.5 UNet with
random weights (speed does not depend on the values). Results: bench/results/distill_<model>_<device>.{json,md}.
"""
import tempfile
import time

import harness
import torch
from bench_unet import build, setup

from devkit.device_info import device_name, device_slug

MODELS = {"tiny": "tiny", "sd15-full": "sd15"}  # this script's names → bench_unet's builders


def measure_stage(pack, model, stage: str, batch_size: int, size: int, dtype: str, warmup: int, steps: int,
                  save_dir: str) -> dict:
    """`warmup` + `steps` distillation steps of one stage (A or B) on random latents; the median timed step gives
    steps/s and samples/s. Peak memory: CUDA max_memory_allocated, else the process's max RSS (never reset)."""
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
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource  # Unix only: on the CPU this benchmark runs on Linux or macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_s = sorted(timings)[len(timings) // 2]
    return {"stage": stage, "steps_per_s": 1 / step_s, "samples_per_s": batch_size / step_s, "peak_mib": peak,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"}


COLUMNS = [("stage", lambda r: r["stage"]), ("steps/s", harness.cell("steps_per_s")),
           ("samples/s", harness.cell("samples_per_s")),
           ("peak memory MiB", lambda r: f"{r['peak_mib']:.0f} ({r['peak_kind']})"),
           ("10 000 steps", lambda r: f"{10_000 / r['steps_per_s'] / 60:.0f} min")]


def markdown(result: dict) -> str:
    meta = result["meta"]
    return "\n".join([
        harness.header(f"Distillation of {meta['model']} on {meta['device']}", meta,
                       f"model: {meta['model']} ({meta['params'] / 1e6:.1f} M UNet parameters), batch "
                       f"{meta['batch_size']}, {meta['latent']}² latents, {meta['dtype']}, {meta['steps_timed']} "
                       "timed steps"),
        harness.columns_table(COLUMNS, result["rows"])]) + "\n"


def main():
    p = harness.parser(__doc__, threads=True)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    args = harness.parse(p)
    pack, device = setup(cpu=not torch.cuda.is_available())
    model, _ = build(MODELS[args.model], device, torch.float32)  # fp32 weights; --dtype is the autocast dtype
    run = harness.Run(__file__)
    with tempfile.TemporaryDirectory() as save_dir:  # the runs' checkpoints are not results
        rows = [measure_stage(pack, model, stage, args.batch_size, args.size, args.dtype, args.warmup, args.steps,
                              save_dir) for stage in ("A", "B")]
    meta = run.meta(device_name(device.type), model=args.model,
                    params=sum(p.numel() for p in model.model.diffusion_model.parameters()),
                    batch_size=args.batch_size, latent=args.size, dtype=args.dtype, steps_timed=args.steps)
    result = {"meta": meta, "rows": rows}
    harness.write(args.out, f"distill_{args.model}_{device_slug(device.type)}", result, markdown(result))


if __name__ == "__main__":
    main()
