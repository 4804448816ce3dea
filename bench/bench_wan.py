"""Wan 2.x block rows: one self-attention site of Wan 2.1 1.3B and 14B at 480p and 720p against its two students,
mediator attention at the default schedule's largest count and the 3-D ΔConv block (the Wan family's kernel).

    python bench/bench_wan.py                  # exact MACs and the GPU model's estimates: wan_macs_model.{json,md}
    python bench/bench_wan.py --device cpu --frames 5 [--threads 2]     # timed: wan_<device>.{json,md}
    python bench/bench_wan.py --device cuda    # timed at the full shapes, fp16 (the GPU check runs it too)

Shapes: Wan's VAE compresses 4× in time and 8× in space and its patch embedding is (1, 2, 2), so F frames of H×W
are a (1 + (F−1)/4) × H/16 × W/16 token grid: 81 frames of 480×832 are 21×30×52 = 32 760 tokens, of 720×1280
21×45×80 = 75 600. MACs are counted op by op on the meta device (bench/op_count.py: what each module really runs,
nothing allocated) and shown beside the students' own `macs`. The GPU model records each forward on fake CUDA
tensors, fp16, and prices every op as bench/gpu_model.py does (torch_path_us): video ΔConv blocks run on PyTorch ops
(the fused kernels are 2-D), and so do mediator attention and attention's projections; ESTIMATES. Timed runs:
medians of forward passes (inference mode), attention being Wan's self_attn without its RoPE (elementwise, and
leaving it out only flatters attention); on the CPU attention is not run where its score matrix would not fit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import bench_block
import harness
import op_count
import torch
from torch import nn

from devkit.comfy_env import import_core
from devkit.device_info import device_name, device_slug

import_core()  # deltaconv_core without the repository root (and its nodes/) on sys.path
from deltaconv_core.block import BlockConfig, RMSNorm  # noqa: E402
from deltaconv_core.families.wan import WAN  # noqa: E402
from deltaconv_core.mediators import DEFAULT_SCHEDULE, DWC_KERNEL, MediatorConfig, pooled_grid  # noqa: E402
from deltaconv_core.students import build_student, student_class  # noqa: E402


@dataclass(frozen=True)
class WanShape:
    dim: int
    heads: int
    blocks: int  # self-attention sites per forward


MODELS = {"1.3B": WanShape(1536, 12, 30), "14B": WanShape(5120, 40, 40)}  # Wan 2.1 (2.2 A14B: the 14B's blocks)
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
FRAMES = 81
MEDIATORS = max(DEFAULT_SCHEDULE.counts)  # the largest count the default schedule runs: its dearest steps
QK_NORM_EPS = 1e-6  # Wan's q/k RMSNorms
# The targets, at 1.3B and 81 frames: attention MACs over mediator attention's, over the ΔConv block's.
TARGETS = {("1.3B", "480p"): (10.0, 40.0), ("1.3B", "720p"): (20.0, 80.0)}
# Attention's rate on the 2-core EPYC of the committed CPU block run (block_cpu-amd-epyc-2c: PixArt 1024² 60.4 GMAC
# in 963 ms, SD1.5 1024² 178.5 GMAC in 3.52 s): what full-shape CPU times would take, an ESTIMATE.
CPU_MACS_PER_S = 60e9
STUDENTS = ("attention", "mediators", "deltaconv")
NAMES = {"attention": "attention", "mediators": f"mediators ({MEDIATORS})", "deltaconv": "ΔConv 3-D"}


def token_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan's (latent frames, h, w) token grid of a video."""
    if frames < 1 or (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"{frames} frames of {height}×{width}: Wan takes 4k+1 frames of sizes divisible by 16")
    return 1 + (frames - 1) // 4, height // 16, width // 16


def student_configs(shape: WanShape) -> tuple[BlockConfig, MediatorConfig]:
    """The configs a Wan site's fresh students get (DeltaConvBlock.initial, MediatorAttention.from_teacher)."""
    block = BlockConfig(shape.dim, WAN.kernel_size("dit", 0), gate=WAN.gate, time_kernel=WAN.time_kernel)
    return block, MediatorConfig(shape.dim, shape.heads, DEFAULT_SCHEDULE, QK_NORM_EPS, DWC_KERNEL)


class WanAttention(nn.Module):
    """Wan's self_attn as far as its cost goes: q/k/v/o with bias, RMSNorms over the whole q and k, multi-head
    attention (`attention(q, k, v, heads)` on [B, N, C]). Without the 3-D RoPE on q and k."""

    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, device=device, dtype=dtype) for _ in range(4))
        self.norm_q, self.norm_k = (RMSNorm(dim, QK_NORM_EPS, device=device, dtype=dtype) for _ in range(2))
        for norm in (self.norm_q, self.norm_k):
            nn.init.ones_(norm.weight)

    def forward(self, x: torch.Tensor, attention=bench_block.sdpa_attention) -> torch.Tensor:
        return self.o(attention(self.norm_q(self.q(x)), self.norm_k(self.k(x)), self.v(x), self.heads))


def modules(shape: WanShape, device=None, dtype=None) -> dict[str, nn.Module]:
    block, mediators = student_configs(shape)
    return {"attention": WanAttention(shape.dim, shape.heads, device, dtype).eval(),
            "mediators": build_student(mediators, device=device, dtype=dtype).eval(),
            "deltaconv": build_student(block, device=device, dtype=dtype).eval()}


def forwards(built: dict, x: torch.Tensor, attention=bench_block.sdpa_attention) -> dict:
    """name → a call of that module's forward on the video x [1, T, H, W, C]."""
    b, c = x.shape[0], x.shape[-1]
    return {"attention": functools.partial(built["attention"], x.reshape(b, -1, c), attention),
            "mediators": functools.partial(built["mediators"], x, MEDIATORS),
            "deltaconv": functools.partial(built["deltaconv"], x)}


# ------------------------------------------------------------------------------------------- MACs and the model
def mac_row(model: str, resolution: str, frames: int = FRAMES) -> dict:
    """One row of exact MACs: each forward counted op by op on the meta device, beside the students' `macs`."""
    shape, grid = MODELS[model], token_grid(frames, *RESOLUTIONS[resolution])
    n, c = math.prod(grid), shape.dim
    with torch.device("meta"):
        calls = forwards(modules(shape), torch.empty(1, *grid, c))
        counted = {name: op_count.macs(call) for name, call in calls.items()}
    block, mediators = student_configs(shape)
    own = {"attention": bench_block.attention_macs(n, c),
           "mediators": student_class(mediators).macs(mediators, grid, MEDIATORS),
           "deltaconv": student_class(block).macs(block, grid)}
    return {"model": model, "resolution": resolution, "frames": frames, "grid": list(grid), "tokens": n,
            "channels": c, "heads": shape.heads, "blocks": shape.blocks, "mediators": MEDIATORS,
            "mediator_grid": list(pooled_grid(MEDIATORS, grid)), "kernel_size": block.kernel_size,
            "time_kernel": block.time_kernel, **{f"{k}_macs": v for k, v in counted.items()},
            **{f"{k}_own_macs": v for k, v in own.items()},
            "mediators_reduction": counted["attention"] / counted["mediators"],
            "deltaconv_reduction": counted["attention"] / counted["deltaconv"],
            "projection_bound": counted["attention"] / (4 * n * c * c)}


def model_row(row: dict, d) -> dict:
    """The GPU model's times (ms, at the fast and the slow SDPA rate) of one row's three forwards, fp16, on
    gpu_model.Device `d`."""
    import gpu_model  # here: it imports triton, which gpu_check's smoke mode imports only after TRITON_INTERPRET

    shape, grid = MODELS[row["model"]], tuple(row["grid"])
    with op_count.fake_cuda():
        calls = forwards(modules(shape, "cuda", torch.float16),
                         torch.empty(1, *grid, shape.dim, device="cuda", dtype=torch.float16))
        ops = {name: op_count.record(call) for name, call in calls.items()}
    out = {"model": row["model"], "resolution": row["resolution"], "device": d.name}
    for name, recorded in ops.items():
        gpu, host = gpu_model.torch_path_us(recorded, d)
        out.update({f"{name}_ms": [max(t, host) / 1e3 for t in gpu], f"{name}_launches": len(recorded),
                    f"{name}_host_ms": host / 1e3})
    for name in STUDENTS[1:]:
        out[f"{name}_speedup"] = [a / s for a, s in zip(out["attention_ms"], out[f"{name}_ms"])]
    return out


def count_and_model(models=MODELS, resolutions=RESOLUTIONS, devices=("h200", "h100")) -> dict:
    import gpu_model

    rows = [mac_row(m, r) for m in models for r in resolutions]
    return {"rows": rows, "model": [model_row(r, gpu_model.DEVICES[d]) for d in devices for r in rows],
            "devices": {d: dataclasses.asdict(gpu_model.DEVICES[d]) for d in devices}}


# ------------------------------------------------------------------------------------------------------- timing
def timed(name: str, fn, device: str, timing: dict, fits: bool = True) -> dict:
    """fn's median ms and peak memory (CUDA), or why it has none: did not fit (CPU), out of memory, an error."""
    found = {f"{name}_median_ms": None, f"{name}_peak_bytes": None, f"{name}_error": None}
    if not fits:
        return {**found, f"{name}_error": "did not fit"}
    try:
        fn()  # untimed: the first call at a shape
        times = bench_block.bench(fn, device, **timing)
        return {**found, f"{name}_median_ms": bench_block.median_ms(times),
                f"{name}_peak_bytes": bench_block.peak_bytes(fn, device)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**found, f"{name}_error": "out of memory"}
    except Exception as e:  # one forward that fails is a result, not the end of the run
        return {**found, f"{name}_error": f"{type(e).__name__}: {e}"}


def measure(models: dict, resolutions: dict, frames: int, device: str, dtype, repeats: int = 3, warmup: int = 1,
            cell_budget: float = 2.0, attention=bench_block.sdpa_attention):
    """Yields one row per (model, resolution): attention (`attention(q, k, v, heads)`), mediator attention at
    MEDIATORS and the 3-D ΔConv block timed at `frames` frames, with their MACs (the students' own count)."""
    timing = {"repeats": repeats, "warmup": warmup, "budget_s": cell_budget}
    torch.manual_seed(0)
    with torch.inference_mode():
        for model, shape in models.items():
            built = modules(shape, device, dtype)
            block, mediators = student_configs(shape)
            for resolution, size in resolutions.items():
                grid = token_grid(frames, *size)
                n, c = math.prod(grid), shape.dim
                x = torch.randn(1, *grid, c, device=device, dtype=dtype)
                scores = shape.heads * n * n * max(x.element_size(), 4)  # SDPA's math path on the CPU: fp32
                fits = device == "cuda" or scores <= 0.9 * bench_block.available_cpu_bytes()
                row = {"model": model, "resolution": resolution, "frames": frames, "grid": list(grid), "tokens": n,
                       "channels": c, "attention_macs": bench_block.attention_macs(n, c),
                       "mediators_macs": student_class(mediators).macs(mediators, grid, MEDIATORS),
                       "deltaconv_macs": student_class(block).macs(block, grid)}
                for name, call in forwards(built, x, attention).items():
                    row.update(timed(name, call, device, timing, fits or name != "attention"))
                for name in STUDENTS[1:]:
                    a, s = row["attention_median_ms"], row[f"{name}_median_ms"]
                    row[f"{name}_speedup"] = None if a is None or s is None else a / s
                print(f"{model} {resolution} {frames} frames: " + ", ".join(
                    f"{name} " + (row[f"{name}_error"] or f"{row[f'{name}_median_ms']:.2f} ms") for name in STUDENTS),
                      flush=True)
                yield row


# ------------------------------------------------------------------------------------------------------- report
def gmac(key: str):
    return harness.cell(key, "{:,.1f}", 1e9)


def video(r: dict) -> str:
    return f"{r['resolution']}, {r['frames']} frame{'s' * (r['frames'] != 1)}"


def grid_cell(r: dict) -> str:
    return "×".join(map(str, r["grid"])) + f" ({r['tokens']:,})"


def columns(rows: list[dict], predicted: dict | None = None) -> list:
    """The (header, cell) columns of timed rows; `predicted` (model, resolution) → the GPU model's row."""
    ms = lambda name: lambda r: (r.get(f"{name}_error") or "—" if r.get(f"{name}_median_ms") is None
                                 else f"{r[f'{name}_median_ms']:.2f}")
    found = [("model", lambda r: r["model"]), ("video", video), ("token grid", grid_cell),
             *((f"{NAMES[n]} ms", ms(n)) for n in STUDENTS),
             *((f"speed-up {NAMES[n]}", harness.cell(f"{n}_speedup", "{:.1f}×")) for n in STUDENTS[1:]),
             *((f"{NAMES[n]} GMAC", gmac(f"{n}_macs")) for n in STUDENTS)]
    if predicted:
        span = lambda v: f"{min(v):.2f}" if abs(v[0] - v[1]) < 5e-3 else f"{min(v):.2f}–{max(v):.2f}"
        found.append(("model ms " + " / ".join(NAMES.values()), lambda r: " / ".join(
            span(p[f"{n}_ms"]) for p in [predicted.get((r["model"], r["resolution"]))] if p for n in STUDENTS)
            or "—"))
    if any(r.get("deltaconv_peak_bytes") is not None for r in rows):
        found.append(("peak MiB " + " / ".join(NAMES.values()), lambda r: " / ".join(
            harness.cell(f"{n}_peak_bytes", "{:.0f}", 2**20)(r) for n in STUDENTS)))
    return found


def judged(r: dict, name: str, index: int) -> str:
    need = TARGETS.get((r["model"], r["resolution"]))
    value = f"{r[f'{name}_reduction']:.1f}×"
    if need is None or r["frames"] != FRAMES:
        return value
    return f"{value} (≥ {need[index]:g}×: {'met' if r[f'{name}_reduction'] >= need[index] else 'missed'})"


def count_markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    glance = [[r["model"], video(r), grid_cell(r), gmac("attention_macs")(r), gmac("mediators_macs")(r),
               judged(r, "mediators", 0), f"{r['projection_bound']:.1f}×", gmac("deltaconv_macs")(r),
               judged(r, "deltaconv", 1)] for r in rows]
    detail = [[r["model"], r["resolution"], f"{r['channels']} / {r['heads']}", grid_cell(r),
               "×".join(map(str, r["mediator_grid"])), f"{r['attention_macs']:,}", f"{r['mediators_macs']:,}",
               f"{r['mediators_own_macs'] - r['mediators_macs']:+,}", f"{r['deltaconv_macs']:,}",
               f"{r['deltaconv_own_macs'] - r['deltaconv_macs']:+,}", str(r["blocks"]),
               f"{r['blocks'] * r['attention_macs'] / 1e12:,.1f} / {r['blocks'] * r['mediators_macs'] / 1e12:,.2f} / "
               f"{r['blocks'] * r['deltaconv_macs'] / 1e12:,.2f}",
               f"{r['attention_macs'] / CPU_MACS_PER_S:,.0f}"] for r in rows]
    span = lambda v, f="{:.2f}": f.format(v[0]) if abs(v[0] - v[1]) < 5e-3 else f"{f.format(v[0])}–{f.format(v[1])}"
    parts = [harness.header("Wan 2.x blocks: exact MACs and the GPU model's estimates", meta,
                            "nothing timed: MACs counted op by op on the meta device; GPU times are the performance "
                            "model's ESTIMATES, fp16, batch 1",
                            f"students as a Wan site gets them: mediator attention at {MEDIATORS} mediators (the "
                            f"default schedule {DEFAULT_SCHEDULE.format()}'s largest count; q/k/v/o and the q/k "
                            f"RMSNorms kept from the teacher, 3×3 + 3-tap DWC), ΔConv 3-D block k = "
                            f"{rows[0]['kernel_size']}, {rows[0]['time_kernel']} taps in time, two scales"),
             "## At a glance", "", "Self-attention MACs of one Wan block over each student's (targets at 1.3B, 81 "
             "frames; *bound*: the most mediator attention can reach while it keeps q/k/v/o, attention / 4·N·C²):", "",
             harness.table(["model", "video", "token grid (tokens)", "attention GMAC", f"{NAMES['mediators']} GMAC",
                            "reduction", "bound", "ΔConv 3-D GMAC", "reduction"], glance),
             "", "## Exact MACs per block", "",
             "Counted op by op (bench/op_count.py); *own − counted*: the student's `macs` (what the reports say) "
             "minus the count, 0 where they agree. *per "
             "forward*: × the model's self-attention sites, TMAC. *2-core CPU s*: attention MACs at "
             f"{CPU_MACS_PER_S / 1e9:g} GMAC/s (the committed 2-core CPU block run's attention rate), an ESTIMATE "
             "of one attention call on that CPU.", "",
             harness.table(["model", "video", "C / heads", "token grid (tokens)", "mediator grid", "attention MACs",
                            "mediators MACs", "own − counted", "ΔConv MACs", "own − counted", "blocks",
                            "per forward TMAC attention / mediators / ΔConv", "2-core CPU s"], detail)]
    for d in result["devices"].values():
        cells = [[p["model"], p["resolution"], *(span(p[f"{n}_ms"]) for n in STUDENTS),
                  *(span(p[f"{n}_speedup"], "{:.1f}×") for n in STUDENTS[1:]),
                  " / ".join(str(p[f"{n}_launches"]) for n in STUDENTS)]
                 for p in result["model"] if p["device"] == d["name"]]
        parts += ["", f"## {d['name']}: ESTIMATES", "",
                  "Each forward recorded on fake CUDA tensors (fp16) and priced op by op (gpu_model.torch_path_us): "
                  f"MACs at the GEMM rate ({d['gemm_tflops']:g} TFLOP/s), the SDPA rate ({d['sdpa_tflops'][0]:g}–"
                  f"{d['sdpa_tflops'][1]:g}: the ranges; head dim 128 should sit at the fast end) or on CUDA cores "
                  f"(depthwise convolutions, fp32 SDPA: {d['cuda_core_tflops']:g}, a guess), or bytes at "
                  f"{d['bandwidth_tbs']:g} TB/s, at least {d['launch_floor_us']:g} µs a launch, and at least "
                  f"{d['host_us_per_op']:g} µs of host time an op. ΔConv runs on PyTorch ops: the fused kernels take "
                  "images only.", "",
                  harness.table(["model", "video", "attention ms", f"{NAMES['mediators']} ms", "ΔConv 3-D ms",
                                 f"speed-up {NAMES['mediators']}", "speed-up ΔConv 3-D",
                                 "launches attention / mediators / ΔConv"], cells)]
    return "\n".join(parts) + "\n"


def timed_markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [f"precision: {meta['dtype']}, batch 1; medians of up to {meta['repeats']} timed runs after up to "
             f"{meta['warmup']} warm-up runs, cut to fit ~{meta['cell_budget']:g} s per cell",
             f"mediator attention at {MEDIATORS} mediators; ΔConv 3-D on PyTorch ops"]
    return "\n".join([harness.header(f"Wan 2.x blocks on {meta['device']}", meta, *lines),
                      harness.columns_table(columns(rows), rows)]) + "\n"


def main():
    p = harness.parser(__doc__, threads=True)
    p.add_argument("--device", choices=("cpu", "cuda"), help="time the forwards there (default: count and model)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--resolutions", default=",".join(RESOLUTIONS), help="comma-separated: " + ", ".join(RESOLUTIONS))
    p.add_argument("--frames", type=int, default=FRAMES, help="video frames of timed runs, 4k+1 (default "
                   "%(default)s; fewer make CPU timings fit); the MAC table is always at the default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cell-budget", type=float, default=2.0, help="max seconds of timed runs per forward")
    args = harness.parse(p)
    models = {m: MODELS[m] for m in args.models.split(",")}
    resolutions = {r: RESOLUTIONS[r] for r in args.resolutions.split(",")}
    run = harness.Run(__file__)
    if args.device is None:
        result = count_and_model(models, resolutions)
        # Nothing timed: the host's threads and load do not bear on counts and estimates, so none are recorded.
        result = {"meta": {**run.meta("none (counted on the meta device)", estimate=True), "threads": None,
                           "foreign_load_pct": None}, **result}
        harness.write(args.out, "wan_macs_model", result, count_markdown(result))
        return
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rows = list(measure(models, resolutions, args.frames, args.device, dtype, args.repeats, args.warmup,
                        args.cell_budget))
    meta = run.meta(device_name(args.device), dtype=str(dtype)[6:], frames=args.frames, repeats=args.repeats,
                    warmup=args.warmup, cell_budget=args.cell_budget)
    result = {"meta": meta, "rows": rows}
    harness.write(args.out, f"wan_{device_slug(args.device)}", result, timed_markdown(result))


if __name__ == "__main__":
    main()
