"""Block-level benchmark: one ΔConvBlock vs. the self-attention it replaces, SD1.5, SDXL and PixArt layer shapes.

    python bench/bench_block.py [--device cpu|cuda] [--threads N] [--repeats R]
        [--families sd15,sdxl,pixart] [--images 512,1024,2048,4096] [--out bench/results]

Attention = q/k/v projections (no bias) + scaled_dot_product_attention (the family's heads) + output projection
(with bias), i.e. the model's attn1; skipped where its score matrix would not fit in memory. \
Times are per forward pass (torch.inference_mode); median and min of the
timed runs. The block runs as ComfyUI runs it: on CUDA through the fused Triton kernels (unless DELTACONV_TRITON=0),
and there it is also timed on PyTorch ops for comparison. Bandwidth: the floor traffic of the block (one read of x,
one write of the output) over its median time, and the same bytes moved by a device-to-device copy. Mediator
attention (the second student, deltaconv_core.mediators) is timed at the same shapes: at fixed counts and averaged
over a schedule's sampling steps. Writes block_<device-slug>.json (records) and block_<device-slug>.md (tables +
header) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
import torch
import torch.nn.functional as F
from device_info import busy_cpu_s, device_name, device_slug
from torch import nn

from devkit.comfy_env import import_core

import_core()  # deltaconv_core without the repository root (and its nodes/) on sys.path
from deltaconv_core import kernels  # noqa: E402
from deltaconv_core.block import BlockConfig, build_block  # noqa: E402
from deltaconv_core.mediator_schedule import MediatorSchedule  # noqa: E402
from deltaconv_core.mediators import DEFAULT_SCHEDULE, MediatorConfig, mediator_macs  # noqa: E402
from deltaconv_core.students import build_student  # noqa: E402

# Self-attention sites per family (docs/design.md, the official layout): (label, channels C, official kernel k,
# image pixels per token, attention heads). SD: latent = image/8, halved per level; PixArt: latent/8 in 2×2 patches.
FAMILIES = {
    "sd15": [("down_blocks.0", 320, 7, 8, 8), ("up_blocks.3", 320, 11, 8, 8), ("down/up_blocks.1/2", 640, 9, 16, 8),
             ("down/up_blocks.2/1", 1280, 5, 32, 8)],
    "sdxl": [("down_blocks.1", 640, 9, 16, 10), ("up_blocks.1", 640, 13, 16, 10), ("down_blocks.2", 1280, 7, 32, 20),
             ("mid/up_blocks.0", 1280, 9, 32, 20)],
    "pixart": [("blocks.0-27", 1152, 13, 16, 16)],
}
IMAGES = [512, 1024, 2048, 4096]
# Mediator attention rows: record-key prefix → schedule (a fixed count, or the default schedule's step average).
MEDIATORS = {"mediators_n16": MediatorSchedule.fixed(16), "mediators_n64": MediatorSchedule.fixed(64),
             "mediators_schedule": DEFAULT_SCHEDULE}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head SDPA on [B, N, C] q/k/v → [B, N, C] (the call shape of ComfyUI's optimized_attention)."""
    b, n, c = q.shape
    q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class SelfAttention(nn.Module):
    """SD1.5 attn1: x@Wq, x@Wk, x@Wv (no bias) → multi-head attention → output projection (bias). [B, N, C] → [B, N, C].
    `attention(q, k, v, heads)` is the attention kernel to time (SDPA by default)."""

    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (
            nn.Linear(dim, dim, bias=False, device=device, dtype=dtype) for _ in range(3))
        self.to_out = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attention=sdpa_attention) -> torch.Tensor:
        return self.to_out(attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


def attention_macs(n: int, c: int) -> int:
    return 4 * n * c * c + 2 * n * n * c


def deltaconv_macs(n: int, c: int, k: int, scales=(1.0, 0.5)) -> int:
    """Spec §1.2: per token C·C/2 (conv_up) + (n·C/4)·C (conv_out) + k²·(C/2)·Σs² (depthwise), × N; + C² (pool)."""
    per_token = c * c // 2 + len(scales) * (c // 4) * c + k * k * (c // 2) * sum(s * s for s in scales)
    return int(n * per_token + c * c)


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def run_once(fn, device: str) -> float:
    """Seconds for one fn() call: CUDA events on GPU, perf_counter on CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(fn, device: str, repeats: int, warmup: int, budget_s: float) -> tuple[list[float], int]:
    """Times fn(). The first warm-up run estimates its cost; warm-up and timed runs are cut to fit budget_s."""
    first = run_once(fn, device)
    for _ in range(warmup - 1 if first * warmup <= budget_s / 2 else 0):
        fn()
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    return [run_once(fn, device) for _ in range(n)], n


def peak_bytes(fn, device: str) -> int | None:
    """Memory one fn() call allocates at its peak beyond what was already allocated (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fmt_mib(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.0f}"


def fmt_ms(times) -> str:
    return f"{statistics.median(times) * 1e3:.2f} ({min(times) * 1e3:.2f})"


def fmt_baseline(name: str, measured: dict) -> str:
    if measured["times"] is None:
        return f"{name} {measured['error'] or 'skipped'}"
    return f"{name} {fmt_ms(measured['times'])} ms x{measured['repeats']}"


def torch_ops(fn):
    """fn run with the Triton kernels switched off (the block's PyTorch path)."""
    def run():
        kernels.set_enabled(False)
        try:
            return fn()
        finally:
            kernels.set_enabled(None)
    return run


def time_attention(attn: SelfAttention, fn, x: torch.Tensor, device: str, repeats: int, warmup: int,
                   budget_s: float) -> dict:
    """One attention baseline on x [B, H, W, C] taken as tokens: its times and peak memory, or why it has none.
    On CPU, SDPA materialises the B·heads·N² scores: skipped when they would not fit. On CUDA, out of memory (or a
    kernel that refuses the shape, e.g. SageAttention's head sizes) is recorded instead."""
    b, n, c = x.shape[0], x.shape[1] * x.shape[2], x.shape[3]
    if device != "cuda" and b * attn.heads * n * n * x.element_size() > 0.9 * available_bytes(device):
        return {"times": None, "repeats": 0, "peak": None, "error": None}
    xa = x.view(b, n, c)
    try:
        times, rep = bench(lambda: attn(xa, fn), device, repeats, warmup, budget_s)
        return {"times": times, "repeats": rep, "peak": peak_bytes(lambda: attn(xa, fn), device), "error": None}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"times": None, "repeats": 0, "peak": None, "error": "out of memory"}
    except Exception as e:  # a baseline that fails is a result, not the end of the benchmark
        return {"times": None, "repeats": 0, "peak": None, "error": f"{type(e).__name__}: {e}"}


def time_mediators(student, x: torch.Tensor, schedules: dict, device: str, repeats: int, warmup: int,
                   budget_s: float) -> dict:
    """Mediator attention on x [B, H, W, C], per schedule (record-key prefix → MediatorSchedule): time, MACs and
    peak memory averaged over its sampling steps, each count weighted by its share of them (a fixed count: that
    count's). Each count is timed once, whichever schedules share it."""
    b, h, w, c = x.shape
    per_count = {}
    for n in sorted({n for schedule in schedules.values() for n in schedule.distinct_counts()}):
        run = functools.partial(student, x, n)
        student(x, n)  # untimed: the first call at a shape
        times, rep = bench(run, device, repeats, warmup, budget_s)
        per_count[n] = (statistics.median(times), rep, peak_bytes(run, device), b * mediator_macs((h, w), c, n))
    rec = {}
    for name, schedule in schedules.items():
        parts = [(end - start, per_count[n]) for start, end, n in schedule.segments()]
        peaks = [m[2] for _, m in parts]
        rec.update({f"{name}_schedule": schedule.format(),
                    f"{name}_median_ms": sum(f * m[0] for f, m in parts) * 1e3,
                    f"{name}_macs": round(sum(f * m[3] for f, m in parts)),
                    f"{name}_peak_bytes": None if None in peaks else max(peaks),
                    f"{name}_repeats": min(m[1] for _, m in parts)})
    return rec


def measure(families: dict, images, device: str, dtype, batch: int = 1, repeats: int = 7, warmup: int = 2,
            cell_budget: float = 20.0, baselines=None, compiled: bool = False, mediators=None):
    """Yields one record per (family, site, image), families being {name: sites} as in FAMILIES: ΔConv as the
    model runs it (the Triton kernels where they run, then also on PyTorch ops), a device copy of the floor bytes,
    and each attention baseline (name → fn(q, k, v, heads); default {"attention": SDPA}), the first of which gives
    the speed-up. `compiled`: on the PyTorch path, also the block under torch.compile (inductor, static shapes).
    `mediators`: mediator attention per schedule (record-key prefix → MediatorSchedule; default MEDIATORS, {} for
    none), see time_mediators."""
    mediators = MEDIATORS if mediators is None else mediators
    baselines = baselines or {"attention": sdpa_attention}
    common = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""), "batch": batch}
    first = next(iter(baselines))
    attn_cache, copy_cache = {}, {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for family, label, c, k, per_token, heads in ((f, *site) for f, sites in families.items() for site in sites):
            block = build_block(BlockConfig(dim=c, kernel_size=k), device=device, dtype=dtype).eval()
            attn = SelfAttention(c, heads, device=device, dtype=dtype).eval()
            student = build_student(MediatorConfig(c, heads), device=device, dtype=dtype).eval()
            block_compiled = torch.compile(block, dynamic=False) if compiled else None
            for image in images:
                g = image // per_token
                n, cell_busy, cell_t0 = g * g, busy_cpu_s(), time.perf_counter()
                x = torch.randn(batch, g, g, c, device=device, dtype=dtype)
                fused = kernels.use_triton(x)  # x's dtype is the gate input's: the block takes the kernels
                block(x)  # untimed: compiles the kernels for this shape, so the first timed run is a real one
                run = functools.partial(block, x)  # called within this iteration
                d_times, d_rep = bench(run, device, repeats, warmup, cell_budget)
                d_peak = peak_bytes(run, device)
                path = "triton" if fused and kernels.failure() is None else "torch"
                t_times = None
                if path == "triton":  # the same block on PyTorch ops, for comparison
                    t_times, _ = bench(torch_ops(run), device, repeats, warmup, cell_budget)
                comp_times = None
                if block_compiled is not None and path == "torch":
                    block_compiled(x)  # untimed: compiles for this shape
                    comp_times, _ = bench(functools.partial(block_compiled, x), device, repeats, warmup, cell_budget)
                if (c, g) not in copy_cache:  # the floor traffic moved by a plain copy: x read, y written
                    y = torch.empty_like(x)
                    copy_cache[(c, g)] = bench(functools.partial(y.copy_, x), device, repeats, warmup, cell_budget)[0]
                    del y
                c_times = copy_cache[(c, g)]
                floor_bytes = 2 * x.numel() * x.element_size()
                for name, fn in baselines.items():  # attention does not depend on k: measured once per shape
                    if (name, c, g, heads) not in attn_cache:
                        attn_cache[(name, c, g, heads)] = time_attention(attn, fn, x, device, repeats, warmup,
                                                                         cell_budget)
                measured = {name: attn_cache[(name, c, g, heads)] for name in baselines}
                mediated = time_mediators(student, x, mediators, device, repeats, warmup, cell_budget)
                # /proc/stat counts in 10 ms ticks: clamp at 0, flag (⚠) only > 0.1 CPU-s and > 5 % of the cores
                cell_other = None if cell_busy is None else max(0.0, busy_cpu_s() - cell_busy)
                cell_s = time.perf_counter() - cell_t0
                cell_pct = None if cell_other is None else 100 * cell_other / (cell_s * os.cpu_count())
                d_macs, a_macs = batch * deltaconv_macs(n, c, k), batch * attention_macs(n, c)
                rec = {**common, "family": family, "image": image, "site": label, "channels": c, "kernel_size": k,
                       "heads": heads, "grid": g, "tokens": n, "deltaconv_peak_bytes": d_peak,
                       "deltaconv_path": path, "kernel_failure": kernels.failure(),
                       "deltaconv_median_ms": statistics.median(d_times) * 1e3, "deltaconv_min_ms": min(d_times) * 1e3,
                       "deltaconv_repeats": d_rep, "deltaconv_times_ms": [t * 1e3 for t in d_times],
                       "deltaconv_torch_ops_median_ms": None if t_times is None else statistics.median(t_times) * 1e3,
                       "deltaconv_compiled_median_ms":
                           None if comp_times is None else statistics.median(comp_times) * 1e3,
                       "floor_bytes": floor_bytes, "copy_median_ms": statistics.median(c_times) * 1e3,
                       "deltaconv_floor_gbps": floor_bytes / statistics.median(d_times) / 1e9,
                       "copy_gbps": floor_bytes / statistics.median(c_times) / 1e9,
                       "floor_fraction_of_copy": statistics.median(c_times) / statistics.median(d_times),
                       "attention_matrix_bytes": batch * heads * n * n * x.element_size()}
                for name, m in measured.items():
                    a_times = m["times"]
                    rec.update({f"{name}_skipped": a_times is None, f"{name}_error": m["error"],
                                f"{name}_peak_bytes": m["peak"], f"{name}_repeats": m["repeats"],
                                f"{name}_median_ms": None if a_times is None else statistics.median(a_times) * 1e3,
                                f"{name}_min_ms": None if a_times is None else min(a_times) * 1e3,
                                f"{name}_times_ms": None if a_times is None else [t * 1e3 for t in a_times]})
                speedup = None if rec[f"{first}_skipped"] else rec[f"{first}_median_ms"] / rec["deltaconv_median_ms"]
                rec.update({"speedup": speedup,
                            "deltaconv_macs": d_macs, "attention_macs": a_macs, "mac_ratio": a_macs / d_macs,
                            "other_processes_cpu_s": cell_other, "other_processes_cpu_pct": cell_pct,
                            "contaminated": bool(cell_other and cell_other > 0.1 and cell_pct > 5), **mediated})
                baseline_text = ", ".join([*(fmt_baseline(name, m) for name, m in measured.items()),
                                           *(f"{name} {mediated[f'{name}_median_ms']:.2f} ms" for name in mediators)])
                print(f"{family} {image}² {label} C={c} k={k} {g}x{g}: ΔConv ({path}) {fmt_ms(d_times)} ms x{d_rep}"
                      f"{'' if t_times is None else f', on torch ops {fmt_ms(t_times)} ms'}"
                      f"{'' if comp_times is None else f', compiled {fmt_ms(comp_times)} ms'}, "
                      f"{rec['deltaconv_floor_gbps']:.3g} GB/s floor ({100 * rec['floor_fraction_of_copy']:.0f}% of "
                      f"copy), {baseline_text}", flush=True)
                yield rec


def mediator_table(records: list[dict], mediators: dict) -> str:
    """The second student side by side with ΔConv and attention at the same shapes: ms, GMAC and peak MiB."""
    names = [n.replace("mediators_", "") for n in mediators]
    counts = ", ".join(f"{n}: {s.format()}" for n, s in zip(names, mediators.values(), strict=True))
    head = (f"Mediator attention ({counts}; "
            "schedule = averaged over its sampling steps)\n\n"
            "| family | image | site | C | heads | grid | ΔConv ms | attention ms | "
            + " | ".join(f"mediators {n} ms" for n in names) + " | ΔConv GMAC | attention GMAC | "
            + " | ".join(f"mediators {n} GMAC" for n in names) + " | peak MiB Δ/attn/" + "/".join(names) + " |\n"
            + "|---" * (10 + 2 * len(names)) + "|")
    rows = []
    for r in records:
        attn = "skipped" if r["attention_skipped"] else f"{r['attention_median_ms']:.2f}"
        peaks = "/".join(fmt_mib(r[k]) for k in ("deltaconv_peak_bytes", "attention_peak_bytes",
                                                  *(f"{n}_peak_bytes" for n in mediators)))
        rows.append(f"| {r['family']} | {r['image']}² | {r['site']} | {r['channels']} | {r['heads']} | {r['grid']}² | "
                    f"{r['deltaconv_median_ms']:.2f} | {attn} | "
                    + " | ".join(f"{r[f'{n}_median_ms']:.2f}" for n in mediators)
                    + f" | {r['deltaconv_macs'] / 1e9:.3f} | {r['attention_macs'] / 1e9:.3f} | "
                    + " | ".join(f"{r[f'{n}_macs'] / 1e9:.3f}" for n in mediators) + f" | {peaks} |")
    return "\n".join([head, *rows])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cell-budget", type=float, default=20.0, help="max seconds of timed runs per cell (repeats adapt)")
    p.add_argument("--families", default="sd15,sdxl,pixart", help="comma-separated: " + ", ".join(FAMILIES))
    p.add_argument("--images", default=",".join(map(str, IMAGES)),
                   help="comma-separated image sizes; each site's token grid follows from it (default: %(default)s)")
    p.add_argument("--compiled", action="store_true",
                   help="also time the PyTorch path under torch.compile (inductor; compiles once per block and size)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--variant", default="", help="results named block_<variant>_<device> (a partial run beside a "
                   "full one)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device, dtype = args.device, (torch.float16 if args.device == "cuda" else torch.float32)
    name = device_name(device)
    common = {"dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    print(f"# {name} | torch {torch.__version__} | {device} {common['dtype']} | threads {common['threads']}",
          flush=True)

    images = [int(i) for i in args.images.split(",")]
    families = args.families.split(",")
    busy_before = busy_cpu_s()
    t_start = time.perf_counter()
    records = list(measure({f: FAMILIES[f] for f in families}, images, device, dtype, args.batch, args.repeats,
                           args.warmup, args.cell_budget, compiled=args.compiled))
    elapsed = time.perf_counter() - t_start
    other = None if busy_before is None else busy_cpu_s() - busy_before
    load = "n/a" if other is None else f"{other:.1f} CPU-s used by other processes during the run " \
        f"({100 * other / (elapsed * os.cpu_count()):.1f}% of all cores; >~1% skews CPU timings; " \
        f"⚠ = row during which they used >0.1 CPU-s and >5%)"
    for r in records:
        r["run_other_processes_cpu_s"] = other

    head = ("| family | image | site | C | k | grid | N | ΔConv ms median (min) | ΔConv on torch ops ms | "
            "ΔConv compiled ms | attention ms median (min) | "
            "speed-up | ΔConv floor GB/s (of copy) | peak MiB Δ/attn | ΔConv GMAC | attention GMAC | MAC ratio | "
            "runs Δ/attn |\n" + "|---" * 18 + "|")
    rows = []
    for r in records:
        attn_cell = ("skipped" if r["attention_skipped"]
                     else f"{r['attention_median_ms']:.2f} ({r['attention_min_ms']:.2f})")
        speed = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        speed += " ⚠" if r["contaminated"] else ""
        torch_cell = "—" if r["deltaconv_torch_ops_median_ms"] is None else f"{r['deltaconv_torch_ops_median_ms']:.2f}"
        compiled_cell = "—" if r["deltaconv_compiled_median_ms"] is None else f"{r['deltaconv_compiled_median_ms']:.2f}"
        rows.append(f"| {r['family']} | {r['image']}² | {r['site']} | {r['channels']} | {r['kernel_size']} | "
                    f"{r['grid']}² | {r['tokens']} | "
                    f"{r['deltaconv_median_ms']:.2f} ({r['deltaconv_min_ms']:.2f}) | {torch_cell} | {compiled_cell} | "
                    f"{attn_cell} | {speed} | "
                    f"{r['deltaconv_floor_gbps']:.3g} ({100 * r['floor_fraction_of_copy']:.0f}%) | "
                    f"{fmt_mib(r['deltaconv_peak_bytes'])}/{fmt_mib(r['attention_peak_bytes'])} | "
                    f"{r['deltaconv_macs'] / 1e9:.3f} | {r['attention_macs'] / 1e9:.3f} | {r['mac_ratio']:.1f}× | "
                    f"{r['deltaconv_repeats']}/{r['attention_repeats']} |")
    table = "\n".join([head, *rows]) + "\n\n" + mediator_table(records, MEDIATORS)
    print("\n" + table)

    failure = kernels.failure()
    paths = ("fused Triton kernels ([pool +] dwconv + gate per scale, fused upsample + concat + conv_out), "
             "also timed on PyTorch ops" if all(r["deltaconv_path"] == "triton" for r in records) else
             "PyTorch ops" + (f" (the Triton kernels failed: {failure})" if failure else
                              " (no Triton kernels for this device/dtype, or DELTACONV_TRITON=0)"))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# ΔConvBlock vs the self-attention it replaces (block level: {', '.join(families)})\n\n"
              f"- device: {name} ({device}, {common['dtype']}, batch {args.batch})\n- torch: {torch.__version__}\n"
              f"- ΔConv path: {paths}\n"
              f"- threads: {common['threads']}; system load: {load}\n- repeats: up to {args.repeats} timed runs "
              f"after up to {args.warmup} "
              f"warm-up runs; per cell the timed runs are cut to fit ~{args.cell_budget:g} s (min 1), and warm-up to 1 "
              f"run for slow cells — actual counts in the last column\n"
              f"- date: {date}; total bench time {elapsed:.0f} s\n"
              f"- attention = q/k/v projections (no bias) + SDPA (the family's heads) + output projection (bias); "
              f"measured once per (C, grid, heads) and shared by rows of the same shape\n"
              f"- grid = image / pixels per token "
              f"(SD: latent = image/8, halved per level; PixArt: 2×2 patches of the latent)\n- peak memory: CUDA "
              f"max_memory_allocated above what was allocated before the call (inputs excluded); — on CPU\n"
              f"- MACs: attention 4·N·C² + 2·N²·C; ΔConv N·(C²/2 + C²/2 + 1.25·k²·C/2) + C² "
              f"(conv_up, conv_out, the gated dwconvs, conv_pool); "
              f"mediator attention 4·N·C² + 4·n·N·C + 9·N·C (n mediators on the pooled grid); "
              f"speed-up = attention median / ΔConv median; attention skipped when the B·heads·N² score matrix "
              f"would exceed 90% of available memory (CPU; on CUDA only when it runs out of memory)\n"
              f"- bandwidth: floor = one read of x + one write of the output (2·B·N·C·{torch.finfo(dtype).bits // 8} "
              f"bytes) / ΔConv median; 'of copy' = that rate / the rate of a device-to-device copy of x into a tensor "
              f"of its size (median of its own timed runs)\n"
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = f"{args.variant}_{device_slug(device)}" if args.variant else device_slug(device)
    (out / f"block_{slug}.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / f"block_{slug}.md").write_text(header + table + "\n")
    print(f"\nwrote {out / f'block_{slug}.json'} and .md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
