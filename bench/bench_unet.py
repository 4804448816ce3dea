"""One UNet step (apply_model) in ComfyUI, self-attention vs ΔConv vs mediator attention, for random-weight SD1.5 /
SDXL / tiny models.

    python bench/bench_unet.py --models sd15 --sizes 512 1024 [--dtype fp16] [--mediators 64]

Mediator attention runs at one fixed count at every site (default 64, the default schedule's largest, that of its
final steps: the dearest step).

Random weights are fine for speed. Median of --repeats timed steps after one warm-up (perf counters on CPU, CUDA
events on GPU), peak memory (CUDA: max_memory_allocated; CPU: not measured per step). Results:
bench/results/unet_<device>.{json,md}.
"""
import argparse
import json
import os
import sys
import time

import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
from device_info import busy_cpu_s, device_name, device_slug

from devkit.comfy_env import load_pack, setup_comfy
from devkit.tiny_models import KOALA_TINY, SD15_TINY, init_random

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15_FULL = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3}
SDXL_FULL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}


def setup(cpu: bool):
    """ComfyUI ($COMFYUI_PATH, else the one this pack is installed in) as a library with this pack loaded: (pack, the
    device ComfyUI runs on)."""
    setup_comfy(None, cpu=cpu)
    pack = load_pack()
    import comfy.model_management

    return pack, comfy.model_management.get_torch_device()


def build(name, device, dtype):
    """A ModelPatcher around a random-weight "tiny", "sd15" or "sdxl" UNet on device, and its context width."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    if name == "sdxl":
        config, cls, ctx = {**KOALA_TINY, **SDXL_FULL}, comfy.supported_models.SDXL, 2048
    else:
        config = {**SD15_TINY, **SD15_FULL} if name == "sd15" else dict(SD15_TINY)
        cls, ctx = comfy.supported_models.SD15, 768
    base = cls({**config, "dtype": dtype}).get_model({})
    base.diffusion_model.to(device, dtype)
    init_random(base.diffusion_model, seed=0)  # on the device: a full SDXL initialises in moments on a GPU
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu")), ctx


def patch(pack, model):
    """The model patched with fresh (random) ΔConv blocks at every self-attention site: (patched, site count)."""
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights

    sites = find_attention_sites(model.model.diffusion_model)
    patched, _, _ = pack.nodes.patching.patch_model(model, DeltaConvWeights.fresh(sites, 0))
    return patched, len(sites.sites)


def patch_mediators(pack, model, count: int):
    """The model patched with mediator attention (initialised from its own attention) at every self-attention site,
    at a fixed count of mediators."""
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.mediator_schedule import MediatorSchedule
    from deltaconv_core.weights import DeltaConvWeights

    schedule = MediatorSchedule.fixed(count)
    weights = DeltaConvWeights.fresh_mediators(find_attention_sites(model.model.diffusion_model),
                                               model.model.diffusion_model, schedule)
    return pack.nodes.patching.patch_model(model, weights)[0]


def remove_attention(model):
    """A clone of `model` whose self-attention sites compute nothing (their output is zero, so the residual keeps its
    input): the fastest any student could make the step, its ceiling."""
    import torch

    from deltaconv_core.families import find_attention_sites

    class NoAttention(torch.nn.Module):
        def forward(self, x, *args, **kwargs):
            return torch.zeros_like(x)

    clone = model.clone()
    for site in find_attention_sites(model.model.diffusion_model).sites:
        clone.add_object_patch(f"diffusion_model.{site.path}", NoAttention())
    return clone


def time_step(model, x, conds, repeats, device):
    import torch

    sigma = torch.full((x.shape[0],), 5.0, device=device)
    model.model.apply_model(x, sigma, **conds)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model.model.apply_model(x, sigma, **conds)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            model.model.apply_model(x, sigma, **conds)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_size(name, model, patched, ctx, size, batch, repeats, device, dtype, mediators=None,
                 removed=None) -> dict:
    """One image size: the median step with attention, with ΔConv, (given `mediators`, a model from
    patch_mediators) with mediator attention and (given `removed`, from remove_attention) with no self-attention at
    all, the ceiling of any student (None when out of memory), and on CUDA the peak memory of each
    (max_memory_allocated, weights included)."""
    import comfy.model_management
    import torch

    g = torch.Generator().manual_seed(size)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
    conds = {"c_crossattn": torch.randn(batch, 77, ctx, generator=g).to(device, dtype)}
    if name == "sdxl":
        conds["y"] = torch.randn(batch, 2816, generator=g).to(device, dtype)
    row = {"model": name, "size": size}
    with torch.inference_mode():
        for label, m in (("attention", model), ("deltaconv", patched), ("mediators", mediators),
                         ("removed", removed)):
            if m is None:
                continue
            comfy.model_management.load_models_gpu([m])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row[f"{label}_s"] = time_step(m, x, conds, repeats, device)
            except torch.cuda.OutOfMemoryError:
                row[f"{label}_s"] = None
                torch.cuda.empty_cache()
            if device.type == "cuda":
                row[f"{label}_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if row["attention_s"] and row["deltaconv_s"]:
        row["speedup"] = row["attention_s"] / row["deltaconv_s"]
    if row["attention_s"] and row.get("mediators_s"):
        row["mediators_speedup"] = row["attention_s"] / row["mediators_s"]
    if row["attention_s"] and row.get("removed_s"):
        row["ceiling"] = row["attention_s"] / row["removed_s"]
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=("tiny", "sd15", "sdxl"))
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="image sizes in pixels")
    p.add_argument("--batch", type=int, default=2, help="2 = cond + uncond, as with CFG")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument("--mediators", type=int, default=64, help="mediator count of the mediator column (0: no column)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the step with self-attention removed")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args()
    import torch

    pack, device = setup(cpu=not torch.cuda.is_available())
    import comfy.model_management

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    rows, busy_before, started = [], busy_cpu_s(), time.perf_counter()
    for name in args.models:
        model, ctx = build(name, device, dtype)
        patched, sites = patch(pack, model)
        mediators = patch_mediators(pack, model, args.mediators) if args.mediators else None
        removed = None if args.no_ceiling else remove_attention(model)
        for size in args.sizes:
            row = {**measure_size(name, model, patched, ctx, size, args.batch, args.repeats, device, dtype, mediators,
                                  removed), "sites": sites, "mediators": args.mediators or None}
            rows.append(row)
            print(row, flush=True)
        comfy.model_management.unload_all_models()
        del model, patched, mediators, removed
    other = None if busy_before is None else busy_cpu_s() - busy_before
    meta = {"device": f"{device_name(device.type)} ({device.type}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": args.batch,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/bench_unet.py " + " ".join(sys.argv[1:]),
            "foreign load %": None if other is None else round(
                100 * other / ((time.perf_counter() - started) * os.cpu_count()), 1)}
    slug = device_slug(device.type)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"unet_{slug}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)

    def fmt(v, unit=""):
        return "–" if v is None else f"{v:.3f}{unit}"

    table = ["| model | sites | image | attention step (s) | ΔConv step (s) | speed-up | mediators step (s) | "
             "speed-up | attn1 removed step (s) | ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['sites']} | {r['size']}² | {fmt(r['attention_s'])} | {fmt(r['deltaconv_s'])} | "
              f"{fmt(r.get('speedup'), '×')} | {fmt(r.get('mediators_s'))} | {fmt(r.get('mediators_speedup'), '×')} | "
              f"{fmt(r.get('removed_s'))} | {fmt(r.get('ceiling'), '×')} |" for r in rows]
    text = "\n".join(["# UNet step: self-attention vs ΔConv vs mediator attention (random weights)", "",
                      f"Mediator attention at {args.mediators or 'no'} mediators per site.", ""] +
                     [f"- {k}: {v}" for k, v in meta.items()] + [""] + table) + "\n"
    with open(os.path.join(args.out, f"unet_{slug}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
