"""GPU check: one command that measures, on one CUDA GPU in about 8 minutes, what this pack claims.

    python bench/gpu_check.py [--only kernels,block,unet,distill] [--out bench/results]
    python bench/gpu_check.py --smoke --out /tmp/check   # CPU, tiny shapes, seconds

Any Python with torch (and triton for the kernels) runs it: ComfyUI's own, for one; nothing to install. ComfyUI is
$COMFYUI_PATH, else the one whose custom_nodes folder holds this pack.

Random weights only, nothing downloaded. The environment (GPU, driver, CUDA, torch, triton, ComfyUI) is always
recorded; the stages are
- kernels: the block on the fused Triton kernels, forward and backward, against float64 (kernel_check.py);
- block: SD1.5, SDXL and PixArt layer shapes at 512²–4096², fp16: ΔConv on the kernels and on PyTorch ops against
  ComfyUI's own optimized_attention (and SageAttention if it imports), and mediator attention at 16 and 64
  mediators and over its default schedule; median time, peak memory, and the time over the bandwidth floor (one
  read of x and one write of y at the device's measured copy speed) (bench_block.py);
- unet: one step of full-size random SD1.5 and SDXL UNets built with ComfyUI's classes, fp16, batch 2, attention vs
  ΔConv vs mediator attention (64 mediators), 512²–2048² and SD1.5 at 4096² (bench_unet.py);
- distill: full-size SD1.5 distillation, stage A and B, batch 8 at 64² latents, bf16 autocast (bench_distill.py).
Each stage has a time budget after which it starts nothing new, and a failure ends only its own stage (or the one
measurement, when it is out of memory). Writes gpu_<device>.{json,md} to --out and prints the targets, each met or
missed. --smoke runs every stage's code on the CPU with tiny shapes (the kernels in Triton's interpreter) and never
judges a speed. Exit status 1 when a stage failed; a missed target is a result, not a failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shutil
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
import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
import gpu_report
import kernel_check
import torch
from device_info import device_name, device_slug

from devkit.comfy_env import find_comfyui

STAGES = ("kernels", "block", "unet", "distill")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each stage measures, and the seconds after which it starts nothing new."""

    device: str
    smoke: bool
    budgets: dict
    block_families: dict = dataclasses.field(default_factory=lambda: dict(bench_block.FAMILIES))
    block_images: tuple = tuple(bench_block.IMAGES)
    block_dtype: torch.dtype = torch.float16
    block_repeats: int = 7
    block_warmup: int = 2
    block_cell_budget: float = 1.0
    unet_runs: tuple = (("sd15", (512, 1024, 2048)), ("sdxl", (512, 1024, 2048)), ("sd15", (4096,)))  # 4096² last
    unet_dtype: torch.dtype = torch.float16
    unet_repeats: int = 3
    unet_mediators: int = 64  # the mediator column's count: the default schedule's largest (its dearest steps)
    distill_model: str = "sd15"
    distill_batch: int = 8
    distill_latent: int = 64
    distill_warmup: int = 3
    distill_steps: int = 10
    distill_dtype: str = "bf16"  # autocast
    model_kernels: bool = True  # the UNets' blocks on the Triton kernels


GPU = Plan("cuda", False, {"kernels": 90, "block": 110, "unet": 180, "distill": 75})  # ≈ 7.6 min with set-up
# Smoke: Triton's interpreter runs each kernel program as Python, seconds per call at 320 channels, so the block
# stage takes one small made-up site (label, C, k, pixels per token, heads) and the UNets run on PyTorch ops.
SMOKE = Plan("cpu", True, {stage: 600 for stage in STAGES}, block_families={"smoke": [("tiny", 16, 3, 8, 2)]},
             block_images=(64,), model_kernels=False, block_dtype=torch.float32, block_repeats=1, block_warmup=1,
             block_cell_budget=0.5, unet_runs=(("tiny", (32,)),), unet_dtype=torch.float32, unet_repeats=1,
             distill_model="tiny", distill_batch=2, distill_latent=4, distill_warmup=1, distill_steps=1,
             distill_dtype="fp32")  # bf16 matmuls crawl on most CPUs


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
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**cell, "error": f"{type(e).__name__}: {e}"}


class OptionalPackageMissing(Exception):
    """A stage that needs an optional package (triton) is skipped with this note, not failed."""


def run_stage(name: str, stage, plan: Plan) -> dict:
    """A stage's rows and notes with its status and time; whatever it raises is its failure, not the run's."""
    t0, notes, trace, skipped = time.monotonic(), [], None, None
    try:
        rows, error = stage(plan, t0 + plan.budgets[name], notes), None
    except OptionalPackageMissing as e:
        rows, error, skipped = [], None, str(e)
        notes.append(f"skipped: {e}")
    except (Exception, SystemExit) as e:  # SystemExit: no ComfyUI at COMFYUI_PATH, say
        rows, error, trace = [], f"{type(e).__name__}: {e}", traceback.format_exc(limit=-4)
    unmeasured = [r for r in rows if "error" in r or "skipped" in r]
    status = ("skipped" if skipped else "failed" if error or any("error" in r for r in rows) else
              "partial" if unmeasured else "ok")
    print(f"[{name}] {status} in {time.monotonic() - t0:.0f} s" + (f": {error or skipped}" if error or skipped
                                                                   else ""), flush=True)
    return {"status": status, "seconds": time.monotonic() - t0, "error": error, "traceback": trace, "notes": notes,
            "rows": rows}


@functools.cache
def comfy_setup(cpu: bool):
    """ComfyUI (COMFYUI_PATH) set up once for the stages that need it: (pack, torch device)."""
    return bench_unet.setup(cpu=cpu)


# ---------------------------------------------------------------------------------------------------- the stages
def stage_kernels(plan: Plan, deadline: float, notes: list) -> list[dict]:
    if not kernel_check.kernels.triton_available():
        raise OptionalPackageMissing("triton is not installed, so there are no fused kernels to check; the block "
                                     "stage times ΔConv on PyTorch ops")
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
                 f"{str(plan.block_dtype).replace('torch.', '')}; floor ratio = ΔConv time / time of a device copy of "
                 f"the same bytes (one read of x, one write of y); peak memory above the inputs")
    planned = [{"family": f, "site": site[0], "image": image, "channels": site[1], "kernel_size": site[2],
                "grid": image // site[3]}
               for f, sites in plan.block_families.items() for site in sites for image in plan.block_images]
    results = bench_block.measure(plan.block_families, plan.block_images, plan.device, plan.block_dtype,
                                  repeats=plan.block_repeats, warmup=plan.block_warmup,
                                  cell_budget=plan.block_cell_budget, baselines=baselines)
    return collect(planned, results, deadline)


def unet_kernels(plan: Plan):
    """A context in which the UNets' blocks use the Triton kernels or not, as the plan says (DELTACONV_TRITON, which
    every copy of the pack reads per call); the environment is restored after."""
    return unittest.mock.patch.dict(os.environ, {} if plan.model_kernels else {"DELTACONV_TRITON": "0"})


def model_predictions(device: str) -> dict:
    """(model, image) → the performance model's ΔConv step speed-up for this GPU class (bench/gpu_model.py's
    committed results), shown beside each measurement so that the first GPU run also checks the model."""
    path = Path(__file__).resolve().parent / "results" / f"gpu_model_{'h100' if 'H100' in device else 'h200'}.json"
    if not path.is_file():
        return {}
    steps = json.loads(path.read_text())["steps"]
    return {(s["family"], s["image"]): f"{min(s['speedup']):.2f}–{max(s['speedup']):.2f}×" for s in steps}


def unet_rows(plan: Plan):
    """Rows of the UNet stage in plan order: one model at a time, built, patched, measured, then let go (also when
    the stage stops early and the generator is closed)."""
    pack, device = comfy_setup(plan.device == "cpu")
    import comfy.model_management

    predicted = model_predictions(device_name(plan.device))
    for name, sizes in plan.unet_runs:
        model, ctx = bench_unet.build(name, device, plan.unet_dtype)
        try:
            patched, sites = bench_unet.patch(pack, model)
            mediators = bench_unet.patch_mediators(pack, model, plan.unet_mediators)
            removed = bench_unet.remove_attention(model)  # the ceiling: the step with no self-attention at all
            for size in sizes:
                cell = {"model": name, "size": size, "sites": sites,
                        **({"model_speedup": predicted[name, size]} if (name, size) in predicted else {})}
                yield {**cell, **guarded(cell, functools.partial(bench_unet.measure_size, name, model, patched, ctx,
                                                                 size, 2, plan.unet_repeats, device, plan.unet_dtype,
                                                                 mediators, removed))}
        finally:
            comfy.model_management.unload_all_models()
            model = patched = mediators = removed = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


def stage_unet(plan: Plan, deadline: float, notes: list) -> list[dict]:
    notes.append(f"batch 2 (CFG), {str(plan.unet_dtype).replace('torch.', '')}, median of {plan.unet_repeats} steps "
                 "after one warm-up; peak memory = CUDA max_memory_allocated during the steps, weights included; "
                 f"mediator attention at {plan.unet_mediators} mediators per site")
    planned = [{"model": name, "size": size} for name, sizes in plan.unet_runs for size in sizes]
    with unet_kernels(plan):
        return collect(planned, unet_rows(plan), deadline)


def distill_rows(plan: Plan, save_dir: str):
    pack, device = comfy_setup(plan.device == "cpu")
    model, _ = bench_unet.build(plan.distill_model, device, torch.float32)  # fp32 master weights, bf16 autocast
    for stage in ("A", "B"):
        yield guarded({"stage": stage}, functools.partial(
            bench_distill.measure_stage, pack, model, stage, plan.distill_batch, plan.distill_latent,
            plan.distill_dtype, plan.distill_warmup, plan.distill_steps, save_dir))


def stage_distill(plan: Plan, deadline: float, notes: list) -> list[dict]:
    autocast = "no autocast" if plan.distill_dtype == "fp32" else f"{plan.distill_dtype} autocast"
    notes.append(f"{plan.distill_model} UNet, batch {plan.distill_batch}, {plan.distill_latent}² latents, fp32 "
                 f"weights, {autocast}, median of {plan.distill_steps} steps after {plan.distill_warmup}; "
                 "10 000 steps projected from steps/s")
    with tempfile.TemporaryDirectory() as save_dir, unet_kernels(plan):  # the runs' checkpoints are not results
        return collect([{"stage": "A"}, {"stage": "B"}], distill_rows(plan, save_dir), deadline)


STAGE_FUNCTIONS = {"kernels": stage_kernels, "block": stage_block, "unet": stage_unet, "distill": stage_distill}


# ---------------------------------------------------------------------------------------------------- the report
def comfyui_version() -> str:
    try:
        path = Path(find_comfyui()) / "comfyui_version.py"
    except SystemExit as e:
        return f"not found ({e})"
    if not path.is_file():
        return "unknown (no comfyui_version.py: older than 0.3)"
    return next((line.split("=", 1)[1].strip().strip("\"'") for line in path.read_text().splitlines()
                 if line.startswith("__version__")), "unknown")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def driver_version() -> str:
    if not shutil.which("nvidia-smi"):
        return "unknown (no nvidia-smi)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


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


def write_report(out: Path, plan: Plan, env: dict, stages: dict, started: float) -> list[dict]:
    found = gpu_report.targets(stages)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]),
            "total time": f"{time.monotonic() - started:.0f} s",
            "random weights": "yes (speed does not depend on them)"}
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"gpu_{device_slug(plan.device)}"
    title = f"GPU check: {env['device']}" + (" (smoke run: no speed here means anything)" if plan.smoke else "")
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "environment": env, "stages": stages,
                                                     "targets": found}, indent=1, default=str) + "\n")
    base.with_suffix(".md").write_text(gpu_report.markdown(title, meta, env, stages, found))
    print(f"\n{gpu_report.targets_table(found)}\n\nwrote {base}.json and .md")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STAGES), help="comma-separated stages (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, kernels in Triton's interpreter")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    only = [name.strip() for name in args.only.split(",")]
    if unknown := sorted(set(only) - set(STAGES)):
        p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: its kernels then run on the CPU
        torch.set_num_threads(1)  # on a busy shared CPU, more threads spin against other processes: 20× slower
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on a CPU")
    plan, started = SMOKE if args.smoke else GPU, time.monotonic()
    env = environment(plan)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    stages = {name: run_stage(name, STAGE_FUNCTIONS[name], plan) for name in STAGES if name in only}
    write_report(Path(args.out), plan, env, stages, started)
    return 1 if any(s["status"] == "failed" for s in stages.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
