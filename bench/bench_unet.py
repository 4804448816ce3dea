"""One UNet step (apply_model) in ComfyUI: self-attention vs ΔConv vs mediator attention vs no self-attention at all
(the ceiling of any student), for random-weight tiny / SD1.5 / SDXL models; on CUDA also ΔConv Patch's default
speed policy `auto` (each step through the patch's model wrapper, as a sampler runs it: after the warm-up call, which
times the sites and the whole call, the plan it kept).

    python bench/bench_unet.py --models sd15 --sizes 512 1024 [--dtype fp16] [--mediators 64] [--threads N]

Mediator attention runs at one fixed count at every site (default 64, the default schedule's largest, that of its
final steps: the dearest step). Random weights are fine for speed. Median of --repeats timed steps after one
warm-up (the wall clock on the CPU, CUDA events on the GPU), peak memory on CUDA (max_memory_allocated, weights
included). Results: bench/results/unet_<device>.{json,md}.
"""
import functools

import harness
import torch

from devkit.comfy_env import load_pack, setup_comfy
from devkit.device_info import device_name, device_slug
from devkit.tiny_models import KOALA_TINY, SD15_TINY, init_random

SD15_FULL = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3}
SDXL_FULL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
COLUMNS = ("attention", "deltaconv", "auto", "mediators", "removed")  # the step's variants, in the order timed


def setup(cpu: bool):
    """ComfyUI ($COMFYUI_PATH, else the one this pack is installed in) as a library with this pack loaded: (pack, the
    device ComfyUI runs on)."""
    setup_comfy(None, cpu=cpu)
    pack = load_pack()
    import comfy.model_management

    return pack, comfy.model_management.get_torch_device()


def unet_config(name: str) -> tuple:
    """ComfyUI's model class, the UNet config and the context width of a "tiny", "sd15" or "sdxl" UNet."""
    import comfy.supported_models

    if name == "sdxl":
        return comfy.supported_models.SDXL, {**KOALA_TINY, **SDXL_FULL}, 2048
    return comfy.supported_models.SD15, {**SD15_TINY, **SD15_FULL} if name == "sd15" else dict(SD15_TINY), 768


def build(name, device, dtype):
    """A ModelPatcher around a random-weight "tiny", "sd15" or "sdxl" UNet on device, and its context width."""
    import comfy.model_patcher

    cls, config, ctx = unet_config(name)
    base = cls({**config, "dtype": dtype}).get_model({})
    base.diffusion_model.to(device, dtype)
    init_random(base.diffusion_model, seed=0)  # on the device: a full SDXL initialises in moments on a GPU
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu")), ctx


def variants(pack, model, mediators: int, auto: bool = False) -> tuple[dict, int]:
    """The model with attention, patched with fresh (random) ΔConv blocks at every self-attention site (and with
    `auto`, the same blocks under the `auto` speed policy), with mediator attention (initialised from its own
    attention, `mediators` per site; 0: none) and with self-attention removed (its output zero, so the residual
    keeps its input: the fastest any student could make the step); and the number of sites."""
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.mediator_schedule import MediatorSchedule
    from deltaconv_core.weights import DeltaConvWeights

    class NoAttention(torch.nn.Module):
        def forward(self, x, *args, **kwargs):
            return torch.zeros_like(x)

    patch = pack.nodes.patching.patch_model
    sites = find_attention_sites(model.model.diffusion_model)
    removed = model.clone()
    for site in sites.sites:
        removed.add_object_patch(f"diffusion_model.{site.path}", NoAttention())
    # The students always run (speed_policy "always"): these columns measure them, not ΔConv Patch's choice.
    found = {"attention": model, "removed": removed,
             "deltaconv": patch(model, DeltaConvWeights.fresh(sites, 0), speed_policy="always")[0]}
    if auto:
        found["auto"] = patch(model, DeltaConvWeights.fresh(sites, 0), speed_policy="auto")[0]
    if mediators:
        found["mediators"] = patch(model, DeltaConvWeights.fresh_mediators(
            sites, model.model.diffusion_model, MediatorSchedule.fixed(mediators)), speed_policy="always")[0]
    return found, len(sites.sites)


def measure_size(name, models: dict, ctx, size, batch, repeats, device, dtype, options=None) -> dict:
    """One image size: the median step of each of `models` (from variants(); None when out of memory), on CUDA
    with its peak memory, and the speed-ups over attention (the removed one's: the ceiling). options: label → the
    transformer_options a sampler would pass (the patch's model wrapper: `auto` needs it), else none."""
    import comfy.model_management
    g = torch.Generator().manual_seed(size)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
    conds = {"c_crossattn": torch.randn(batch, 77, ctx, generator=g).to(device, dtype)}
    if name == "sdxl":
        conds["y"] = torch.randn(batch, 2816, generator=g).to(device, dtype)
    sigma = torch.full((batch,), 5.0, device=device)
    row = {"model": name, "size": size}
    with torch.inference_mode():
        for label in (c for c in COLUMNS if c in models):
            wrapped = (options or {}).get(label, {})
            step = lambda m=models[label], o=wrapped: m.model.apply_model(x, sigma, transformer_options={**o}, **conds)
            comfy.model_management.load_models_gpu([models[label]])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                step()  # warm-up
                row[f"{label}_s"] = sorted(harness.seconds(step, device.type) for _ in range(repeats))[repeats // 2]
            except torch.cuda.OutOfMemoryError:
                row[f"{label}_s"] = None
                torch.cuda.empty_cache()
            if device.type == "cuda":
                row[f"{label}_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    for label, key in (("deltaconv", "speedup"), ("auto", "auto_speedup"), ("mediators", "mediators_speedup"),
                       ("removed", "ceiling")):
        if row["attention_s"] and row.get(f"{label}_s"):
            row[key] = row["attention_s"] / row[f"{label}_s"]
    return row


def steps(pack, device, runs, dtype, batch: int, repeats: int, mediators: int, guard=lambda cell, measure: measure()):
    """The rows of `runs` ((model, image sizes) pairs): one model at a time, built, patched, measured size by size,
    then let go, also when the caller stops early. `guard(cell, measure)`: the GPU check's, one failure per cell."""
    import comfy.model_management
    for name, sizes in runs:
        model, ctx = build(name, device, dtype)
        try:
            models, sites = variants(pack, model, mediators, auto=device.type == "cuda")
            options = {"auto": pack.nodes.compat.transformer_options(models["auto"])} if "auto" in models else {}
            for size in sizes:
                cell = {"model": name, "size": size, "sites": sites}
                row = {**cell, **guard(cell, functools.partial(measure_size, name, models, ctx, size, batch, repeats,
                                                               device, dtype, options))}
                print(row, flush=True)
                yield row
        finally:
            comfy.model_management.unload_all_models()
            model = models = None
            torch.cuda.empty_cache()


def columns(rows: list[dict], mediators) -> list:
    """The (header, cell) columns of a table of these rows (with the performance model's estimate and peak memory
    where the rows have them: the GPU check's)."""
    cell, times = harness.cell, lambda key: harness.cell(key, "{:.2f}×")
    return [("model", lambda r: r["model"]), ("sites replaced", lambda r: str(r.get("sites", ""))),
            ("image", lambda r: f"{r['size']}²"), ("attention step (s)", cell("attention_s", "{:.3f}")),
            ("ΔConv step (s)", cell("deltaconv_s", "{:.3f}")), ("speed-up", times("speedup")),
            *[("performance model's estimate", lambda r: r.get("model_speedup", "—"))]
            * any("model_speedup" in r for r in rows),
            *[("with `auto` (s)", cell("auto_s", "{:.3f}")), ("speed-up", times("auto_speedup"))]
            * any("auto_s" in r for r in rows),
            (f"mediators ({mediators or 'none'}) step (s)", cell("mediators_s", "{:.3f}")),
            ("speed-up", times("mediators_speedup")), ("attn1 removed step (s)", cell("removed_s", "{:.3f}")),
            ("ceiling", times("ceiling")),
            *((f"peak MiB {name}", cell(f"{key}_peak_mib", "{:.0f}")) for name, key in
              (("attention", "attention"), ("ΔConv", "deltaconv"), ("mediators", "mediators"))
              if any(f"{key}_peak_mib" in r for r in rows))]


def glance(rows: list[dict]) -> str:
    """ΔConv's speed-up per model and image, its ceiling, and the performance model's estimate where given."""
    times = lambda key: harness.cell(key, "{:.2f}×")
    estimate = any("model_speedup" in r for r in rows)
    return harness.table(["model", "image", "speed-up", "ceiling", *["estimate"] * estimate],
                         [[r["model"], f"{r['size']}²", times("speedup")(r), times("ceiling")(r),
                           *[r.get("model_speedup", "—")] * estimate] for r in rows])


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    return "\n".join([
        harness.header(f"Whole UNet step on {meta['device']}", meta,
                       f"precision: {meta['dtype']}, batch {meta['batch']}, median of {meta['repeats']} steps"),
        "## At a glance", "", f"ΔConv's speed-up of a whole UNet step ({meta['dtype']}, batch {meta['batch']}; "
        "ceiling: the step with self-attention removed):", "", glance(rows), "", "## Steps", "",
        harness.columns_table(columns(rows, meta["mediators"]), rows)]) + "\n"


def main():
    p = harness.parser(__doc__, threads=True)
    p.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=("tiny", "sd15", "sdxl"))
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="image sizes in pixels")
    p.add_argument("--batch", type=int, default=2, help="2 = cond + uncond, as with CFG")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument("--mediators", type=int, default=64, help="mediator count of the mediator column (0: no column)")
    args = harness.parse(p)
    pack, device = setup(cpu=not torch.cuda.is_available())
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    run = harness.Run(__file__)
    rows = list(steps(pack, device, [(name, args.sizes) for name in args.models], dtype, args.batch, args.repeats,
                      args.mediators))
    meta = run.meta(device_name(device.type), device_type=device.type, dtype=str(dtype)[6:],
                    batch=args.batch, repeats=args.repeats, mediators=args.mediators or None)
    result = {"meta": meta, "rows": rows}
    harness.write(args.out, f"unet_{device_slug(device.type)}", result, markdown(result))


if __name__ == "__main__":
    main()
