"""GPU check: one command that measures, on one CUDA GPU in about 9 minutes, what this pack claims.

    python bench/gpu_check.py [--only kernels,block,wan,unet,distill] [--out bench/results]
    python bench/gpu_check.py --smoke --out /tmp/check   # CPU, tiny shapes, seconds

Any Python with torch (and triton for the kernels) runs it, ComfyUI's own for one; ComfyUI is $COMFYUI_PATH, else
the one whose custom_nodes folder holds this pack. Random weights, nothing downloaded. It records the environment,
then runs the stages:
- kernels: the block on the fused Triton kernels, forward and backward, against float64 (kernel_check.py; skipped
  without triton);
- block: SD1.5, SDXL and PixArt layer shapes at 512²–4096², fp16, against ComfyUI's optimized_attention (and
  SageAttention if it imports), with mediator attention and the time over the bandwidth floor (bench_block.py);
- wan: one Wan 2.1 1.3B and 14B self-attention site at 480p and 720p (81 frames), fp16: attention (ComfyUI's
  optimized_attention), mediator attention at 64 mediators and the 3-D ΔConv block, beside the performance model's
  estimate (bench_wan.py);
- unet: one step of full-size SD1.5 and SDXL UNets, fp16, batch 2: attention, ΔConv, mediator attention and no
  self-attention (the ceiling), beside the performance model's estimate (bench_unet.py, gpu_model.py);
- distill: full-size SD1.5 distillation, stage A and B, batch 8 at 64² latents, bf16 autocast (bench_distill.py).
A stage starts nothing new after its time budget, and a failure ends only its own stage (or the one measurement,
when out of memory). Writes gpu_<device>.{json,md} with the targets, each met or missed: a missed target is a
result, a failed stage exits with 1. --smoke runs every stage's code on the CPU with tiny shapes (the kernels in
Triton's interpreter) and judges no speed.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import unittest.mock
from pathlib import Path

import bench_block
import bench_distill
import bench_unet
import bench_wan
import harness
import kernel_check
import torch

from devkit.comfy_env import find_comfyui
from devkit.device_info import device_name, device_slug

STAGES = ("kernels", "block", "wan", "unet", "distill")
UNET_SPEEDUPS = [("sd15", 512, 1.3), ("sd15", 1024, 2.5), ("sd15", 2048, 5.0), ("sdxl", 1024, 1.3), ("sdxl", 2048, 3.0)]
FLOOR_IMAGE, FLOOR_RATIO = 4096, 1.5  # the block within 1.5× of one read of x + one write of y at copy speed
NOTES = ("error", "skipped")  # what an unmeasured row carries instead of numbers
TARGET_KEYS = ("target", "required", "measured", "status")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each stage measures, and the seconds after which it starts nothing new."""

    device: str
    smoke: bool
    budgets: dict
    block_families: dict = dataclasses.field(default_factory=lambda: dict(bench_block.FAMILIES))
    block_images: tuple = tuple(bench_block.IMAGES)
    block_dtype: torch.dtype = torch.float16
    block_timing: tuple = (7, 2, 1.0)  # repeats, warm-up runs, seconds of timed runs per cell
    wan_models: dict = dataclasses.field(default_factory=lambda: dict(bench_wan.MODELS))
    wan_resolutions: dict = dataclasses.field(default_factory=lambda: dict(bench_wan.RESOLUTIONS))
    wan_frames: int = bench_wan.FRAMES
    wan_dtype: torch.dtype = torch.float16
    wan_timing: tuple = (3, 1, 1.0)  # 14B 720p attention takes about 0.3 s a call: a few runs per cell
    unet_runs: tuple = (("sd15", (512, 1024, 2048)), ("sdxl", (512, 1024, 2048)), ("sd15", (4096,)))  # 4096² last
    unet_dtype: torch.dtype = torch.float16
    unet_repeats: int = 3
    unet_mediators: int = 64  # the mediator column's count: the default schedule's largest (its dearest steps)
    distill: tuple = ("sd15", 8, 64, 3, 10, "bf16")  # model, batch, latent size, warm-up and timed steps, autocast
    model_kernels: bool = True  # the UNets' blocks on the Triton kernels


GPU = Plan("cuda", False, {"kernels": 90, "block": 110, "wan": 50, "unet": 180, "distill": 75})  # ≈ 8.5 min
# Smoke: Triton's interpreter runs each kernel program as Python, seconds per call at 320 channels, so the block
# stage takes one small made-up site (label, C, k, pixels per token, heads) and the UNets run on PyTorch ops.
SMOKE = Plan("cpu", True, {stage: 600 for stage in STAGES}, block_families={"smoke": [("tiny", 16, 3, 8, 2)]},
             block_images=(64,), block_dtype=torch.float32, block_timing=(1, 1, 0.5),
             wan_models={"smoke": bench_wan.WanShape(16, 2, 1)}, wan_resolutions={"64²": (64, 64)}, wan_frames=5,
             wan_dtype=torch.float32, wan_timing=(1, 1, 0.5), unet_runs=(("tiny", (32,)),),
             unet_dtype=torch.float32, unet_repeats=1, distill=("tiny", 2, 4, 1, 1, "fp32"),  # bf16 crawls on CPUs
             model_kernels=False)


# ------------------------------------------------------------------------------------------------ stage plumbing
def collect(planned: list[dict], results, deadline: float) -> list[dict]:
    """One row per planned cell from `results` (an iterator yielding the rows in the planned order): the cells it
    did not reach before the deadline, or after it raised, are rows that say so."""
    rows, note = [], "time budget spent"
    for _ in planned:
        if time.monotonic() > deadline:
            break
        try:
            rows.append(next(results))
        except StopIteration:
            break
        except Exception as e:  # whatever broke, the cells up to here are still results
            rows.append({**planned[len(rows)], "error": f"{type(e).__name__}: {e}"})
            note = "not reached: the cell before it failed"
            break
    return rows + [{**cell, "skipped": note} for cell in planned[len(rows):]]


def guarded(cell: dict, measure) -> dict:
    """measure()'s row, or the cell with the error: one cell out of memory (say) does not end the stage."""
    try:
        return measure()
    except Exception as e:
        torch.cuda.empty_cache()  # a no-op without CUDA
        return {**cell, "error": f"{type(e).__name__}: {e}"}


def run_stage(name: str, stage, plan: Plan) -> dict:
    """A stage's rows and notes with its status and time; whatever it raises is its failure, not the run's. A stage
    that needs an optional package (triton) returns None without it: skipped, not failed."""
    t0, notes, trace, error = time.monotonic(), [], None, None
    try:
        rows = stage(plan, t0 + plan.budgets[name], notes)
    except (Exception, SystemExit) as e:  # SystemExit: no ComfyUI at COMFYUI_PATH, say
        rows, error, trace = [], f"{type(e).__name__}: {e}", traceback.format_exc(limit=-4)
    status = ("skipped" if rows is None else "failed" if error or any("error" in r for r in rows) else
              "partial" if any(k in r for r in rows for k in NOTES) else "ok")
    print(f"[{name}] {status} in {time.monotonic() - t0:.0f} s {error or ''}", flush=True)
    return {"status": status, "seconds": time.monotonic() - t0, "error": error, "traceback": trace, "notes": notes,
            "rows": rows or []}


@functools.cache
def comfy_setup(cpu: bool):
    """ComfyUI (COMFYUI_PATH) set up once for the stages that need it: (pack, torch device)."""
    return bench_unet.setup(cpu=cpu)


# ---------------------------------------------------------------------------------------------------- the stages
def stage_kernels(plan: Plan, deadline: float, notes: list) -> list[dict] | None:
    if not kernel_check.kernels.triton_available():
        notes.append("skipped: triton is not installed, so there are no fused kernels to check; the block stage "
                     "times ΔConv on PyTorch ops")
        return None
    cases = kernel_check.cases(plan.smoke)
    notes.append("forward vs deltaconv_core/reference.py in float64; gradients (input and every parameter) vs the "
                 "block's PyTorch path in float64; errors relative to the largest |reference|")
    results = (guarded({"case": c.label}, functools.partial(kernel_check.check, c, plan.device, i))
               for i, c in enumerate(cases))
    return collect([{"case": c.label} for c in cases], results, deadline)


def sage_attention(q, k, v, heads):
    """SageAttention on [B, N, C] q/k/v, the call shape of ComfyUI's optimized_attention."""
    from sageattention import sageattn  # the stage imports it first, and only then adds this baseline

    b, n, c = q.shape
    q, k, v = (t.view(b, n, heads, c // heads) for t in (q, k, v))
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False).reshape(b, n, c)


def stage_block(plan: Plan, deadline: float, notes: list) -> list[dict]:
    comfy_setup(plan.device == "cpu")
    from comfy.ldm.modules.attention import optimized_attention

    baselines = {"attention": optimized_attention}
    try:
        import sageattention  # noqa: F401  (a baseline only where it imports)

        notes.append(f"SageAttention {package_version('sageattention')}")
        baselines["sage"] = sage_attention
    except Exception as e:  # not installed, or built for another CUDA/torch
        notes.append(f"SageAttention: not available ({type(e).__name__}: {e})")
    notes.append(f"ComfyUI attention: {optimized_attention.__module__}.{optimized_attention.__name__}; batch 1, "
                 f"{str(plan.block_dtype)[6:]}; floor ratio = ΔConv time / time of a device copy of the same "
                 "bytes (one read of x, one write of y); peak memory above the inputs")
    planned = [{"family": f, "site": site[0], "image": image, "channels": site[1], "kernel_size": site[2],
                "grid": image // site[3]}
               for f, sites in plan.block_families.items() for site in sites for image in plan.block_images]
    repeats, warmup, budget = plan.block_timing
    results = bench_block.measure(plan.block_families, plan.block_images, plan.device, plan.block_dtype,
                                  repeats=repeats, warmup=warmup, cell_budget=budget, baselines=baselines)
    return collect(planned, results, deadline)


def wan_predictions(device: str) -> dict:
    """(model, resolution) → the performance model's row for this GPU class (bench_wan.py's committed estimates)."""
    path = harness.RESULTS / "wan_macs_model.json"
    data = json.loads(path.read_text()) if path.is_file() else {"devices": {}, "model": []}
    model = data["devices"].get("h100" if "H100" in device else "h200", {})
    return {(p["model"], p["resolution"]): p for p in data["model"] if p["device"] == model.get("name")}


def stage_wan(plan: Plan, deadline: float, notes: list) -> list[dict]:
    comfy_setup(plan.device == "cpu")
    from comfy.ldm.modules.attention import optimized_attention

    notes.append(f"ComfyUI attention: {optimized_attention.__module__}.{optimized_attention.__name__} inside Wan's "
                 f"self_attn without its RoPE; batch 1, {str(plan.wan_dtype)[6:]}, {plan.wan_frames} frames; "
                 f"mediator attention at {bench_wan.MEDIATORS} mediators; the 3-D ΔConv block on PyTorch ops (the "
                 "fused kernels are 2-D); peak memory above the inputs; model ms: the performance model's estimate")
    planned = [{"model": m, "resolution": r, "frames": plan.wan_frames} for m in plan.wan_models
               for r in plan.wan_resolutions]
    repeats, warmup, budget = plan.wan_timing
    rows = bench_wan.measure(plan.wan_models, plan.wan_resolutions, plan.wan_frames, plan.device, plan.wan_dtype,
                             repeats, warmup, budget, attention=optimized_attention)
    return collect(planned, rows, deadline)


def unet_kernels(plan: Plan):
    """The UNets' blocks on the Triton kernels or not, as the plan says (DELTACONV_TRITON, read per call)."""
    return unittest.mock.patch.dict(os.environ, {} if plan.model_kernels else {"DELTACONV_TRITON": "0"})


def model_predictions(device: str) -> dict:
    """(model, image) → the performance model's ΔConv step speed-up for this GPU class (bench/gpu_model.py's
    committed results), shown beside each measurement so that the first GPU run also checks the model."""
    path = harness.RESULTS / f"gpu_model_{'h100' if 'H100' in device else 'h200'}.json"
    steps = json.loads(path.read_text())["steps"] if path.is_file() else []
    return {(s["family"], s["image"]): f"{min(s['speedup']):.2f}–{max(s['speedup']):.2f}×" for s in steps}


def stage_unet(plan: Plan, deadline: float, notes: list) -> list[dict]:
    notes.append(f"batch 2 (CFG), {str(plan.unet_dtype)[6:]}, median of {plan.unet_repeats} steps after one "
                 "warm-up; peak memory = CUDA max_memory_allocated during the steps, weights included; mediator "
                 f"attention at {plan.unet_mediators} mediators per site")
    pack, device = comfy_setup(plan.device == "cpu")
    predicted = model_predictions(device_name(plan.device))
    planned = [{"model": name, "size": size} for name, sizes in plan.unet_runs for size in sizes]
    with unet_kernels(plan):
        rows = bench_unet.steps(pack, device, plan.unet_runs, plan.unet_dtype, 2, plan.unet_repeats,
                                plan.unet_mediators, guarded)
        found = collect(planned, rows, deadline)
    return [{**r, "model_speedup": predicted[r["model"], r["size"]]} if (r["model"], r["size"]) in predicted else r
            for r in found]


def stage_distill(plan: Plan, deadline: float, notes: list) -> list[dict]:
    name, batch, latent, warmup, steps, dtype = plan.distill
    notes.append(f"{name} UNet, batch {batch}, {latent}² latents, fp32 weights, "
                 f"{'no autocast' if dtype == 'fp32' else f'{dtype} autocast'}, median of {steps} steps after "
                 f"{warmup}; 10 000 steps projected from steps/s")
    pack, device = comfy_setup(plan.device == "cpu")
    model, _ = bench_unet.build(name, device, torch.float32)  # fp32 master weights, autocast
    with tempfile.TemporaryDirectory() as save_dir, unet_kernels(plan):  # the runs' checkpoints are not results
        rows = (guarded({"stage": stage}, functools.partial(bench_distill.measure_stage, pack, model, stage, batch,
                                                            latent, dtype, warmup, steps, save_dir)) for stage in "AB")
        return collect([{"stage": "A"}, {"stage": "B"}], rows, deadline)


STAGE_FUNCTIONS = {"kernels": stage_kernels, "block": stage_block, "wan": stage_wan, "unet": stage_unet,
                   "distill": stage_distill}


# --------------------------------------------------------------------------------------------------- environment
def comfyui_version() -> str:
    try:
        path = Path(find_comfyui()) / "comfyui_version.py"
    except SystemExit as e:
        return f"not found ({e})"
    version = path.read_text().split("__version__", 1)[-1].split("\n")[0] if path.is_file() else ""
    return version.strip(" =\"'") or "unknown (no comfyui_version.py: older than 0.3)"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except OSError:
        return "unknown (no nvidia-smi)"
    return out[0] if out else "unknown"


def environment(plan: Plan) -> dict:
    env = {"device": device_name(plan.device), "mode": "smoke (CPU, tiny shapes, Triton interpreter)" if plan.smoke
           else "full"}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"compute capability": f"{props.major}.{props.minor}",
                    "GPU memory": f"{props.total_memory / 2**30:.0f} GiB", "driver": driver_version(),
                    "CUDA (torch)": torch.version.cuda})
    env.update({"torch": torch.__version__, "triton": package_version("triton"), "ComfyUI": comfyui_version(),
                "sageattention": package_version("sageattention"), "python": platform.python_version(),
                "CPU": device_name("cpu")})
    return env


# ------------------------------------------------------------------------------------------------------- targets
def measured(rows) -> list[dict]:
    return [r for r in rows if not any(k in r for k in NOTES)]


def target(name: str, required: str, value: float | None, met: bool, shown: str) -> dict:
    judged = ("not measured", "not measured") if value is None else (shown, "met" if met else "missed")
    return dict(zip(TARGET_KEYS, (name, required, *judged)))


def targets(stages: dict) -> list[dict]:
    """Every target, judged from the stages that ran; a stage that did not run leaves its targets not measured."""
    kernels, block, unet = (stages.get(name, {}).get("rows", []) for name in ("kernels", "block", "unet"))
    passed = sum(r.get("passed") is True for r in kernels)
    found = [target("kernel correctness: every case passes", "all", passed if kernels else None,
                    passed == len(kernels), f"{passed}/{len(kernels)} pass")]
    done, ratio = measured(block), bench_block.floor_ratio
    for family in bench_block.FAMILIES:
        worst = max((r for r in done if r["family"] == family and r["image"] == FLOOR_IMAGE), key=ratio, default=None)
        found.append(target(f"block {family} {FLOOR_IMAGE}²: ΔConv time / bandwidth floor (worst site)",
                            f"≤ {FLOOR_RATIO}×", worst and ratio(worst), worst and ratio(worst) <= FLOOR_RATIO,
                            worst and f"{ratio(worst):.2f}× ({worst['site']}, {worst['deltaconv_path']})"))
    for image in sorted({r["image"] for r in done}):
        worst = max(((r["deltaconv_peak_bytes"] / r["attention_peak_bytes"], r) for r in done if r["image"] == image
                     and r["deltaconv_peak_bytes"] is not None and r.get("attention_peak_bytes")),
                    key=lambda pair: pair[0], default=None)
        found.append(target(f"block {image}²: peak memory ΔConv / attention (worst site)", "≤ 1×",
                            worst and worst[0], worst and worst[0] <= 1,
                            worst and f"{worst[0]:.2f}× ({worst[1]['family']} {worst[1]['site']})"))
    steps = {(r["model"], r["size"]): r for r in measured(unet)}
    for model, size, need in UNET_SPEEDUPS:
        speedup = steps.get((model, size), {}).get("speedup")
        found.append(target(f"UNet step {model} {size}²: ΔConv vs ComfyUI attention", f"≥ {need}×", speedup,
                            speedup is not None and speedup >= need, f"{speedup or 0:.2f}×"))
        auto = steps.get((model, size), {}).get("auto_speedup")
        found.append(target(f"UNet step {model} {size}²: ΔConv Patch's `auto` vs ComfyUI attention", "≥ 1.0×", auto,
                            auto is not None and auto >= 1.0, f"{auto or 0:.2f}×"))
    for (model, size), r in steps.items():
        a, d = r.get("attention_peak_mib"), r.get("deltaconv_peak_mib")
        if a is not None and d is not None:  # CUDA only
            found.append(target(f"UNet step {model} {size}²: peak memory ΔConv / attention", "≤ 1×", d / a, d <= a,
                                f"{d:.0f} / {a:.0f} MiB"))
    return found


# -------------------------------------------------------------------------------------------------------- report
def stage_table(name: str, rows: list[dict], device: str = "") -> str:
    """A stage's rows as its benchmark shows them; rows it did not measure say why after the cells naming them."""
    mediators = {k: s.format() for k, s in bench_block.MEDIATORS.items()}
    baselines = ["attention", *["sage"] * any("sage_median_ms" in r for r in rows)]
    ids, columns = {"kernels": (1, kernel_check.COLUMNS), "distill": (1, bench_distill.COLUMNS),
                    "block": (6, bench_block.columns(measured(rows), baselines, mediators, family=True)),
                    "wan": (2, bench_wan.columns(measured(rows), wan_predictions(device))),
                    "unet": (3, bench_unet.columns(rows, GPU.unet_mediators))}[name]
    return harness.columns_table(columns, rows, ids)


def markdown(result: dict) -> str:
    meta, env, stages = result["meta"], result["environment"], result["stages"]
    smoke = " (smoke run: no speed here means anything)" if meta.get("smoke") else ""
    parts = [harness.header(f"GPU check on {env['device']}{smoke}", meta)]
    steps = measured(stages.get("unet", {}).get("rows", []))
    if steps and not meta.get("smoke"):
        parts += ["## At a glance", "", "ΔConv's speed-up of a whole UNet step (batch 2, fp16; ceiling: the step "
                  "with self-attention removed; estimate: the performance model's):", "", bench_unet.glance(steps), ""]
    parts += ["## Targets", "", harness.columns_table([(k, lambda t, k=k: t[k]) for k in TARGET_KEYS],
                                                      result["targets"]), "", "## Environment", "",
              harness.table(["", ""], [[k, str(v)] for k, v in env.items()])]
    for name, stage in stages.items():
        parts += ["", f"## {name}", "", f"- status: {stage['status']} in {stage['seconds']:.0f} s"
                  + (f" — {stage['error']}" if stage["error"] else ""), *(f"- {note}" for note in stage["notes"])]
        if stage["rows"]:
            parts += ["", stage_table(name, stage["rows"], env["device"])]
    return "\n".join(parts) + "\n"


def main() -> int:
    p = harness.parser(__doc__)
    p.add_argument("--only", default=",".join(STAGES), help="comma-separated stages (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, kernels in Triton's interpreter")
    args = harness.parse(p)
    only = [name.strip() for name in args.only.split(",")]
    if unknown := sorted(set(only) - set(STAGES)):
        p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: its kernels then run on the CPU
        torch.set_num_threads(1)  # on a busy shared CPU, more threads spin against other processes: 20× slower
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on a CPU")
    plan, run = SMOKE if args.smoke else GPU, harness.Run(__file__)
    env = environment(plan)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    stages = {name: run_stage(name, STAGE_FUNCTIONS[name], plan) for name in STAGES if name in only}
    result = {"meta": run.meta(env["device"], smoke=plan.smoke), "environment": env, "stages": stages,
              "targets": targets(stages)}
    harness.write(args.out, f"gpu_{device_slug(plan.device)}", result, markdown(result))
    return 1 if any(s["status"] == "failed" for s in stages.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
