"""Block-level benchmark: one ΔConv block vs. the self-attention it replaces, at SD1.5, SDXL and PixArt layer shapes.

    python bench/bench_block.py [--device cpu|cuda] [--threads N] [--repeats R] [--cell-budget S]
        [--families sd15,sdxl,pixart] [--images 512,1024,2048,4096] [--variant NAME] [--out bench/results]

Attention = the model's attn1: q/k/v projections, SDPA with the family's heads, output projection; on the CPU it is
skipped where its score matrix would not fit in memory. Medians of forward passes (inference mode). The block runs
as ComfyUI runs it: on CUDA through the fused Triton kernels, there also timed on PyTorch ops. Mediator attention is
timed at the same shapes (fixed counts, and averaged over a schedule's steps), and a device copy of the block's floor
bytes (x read, y written) gives the GPU check its bandwidth floor. Writes block[_<variant>]_<device>.{json,md}.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import nn

from devkit.comfy_env import import_core
from devkit.device_info import busy_cpu_s, device_name, device_slug, foreign_load

import_core()  # deltaconv_core without the repository root (and its nodes/) on sys.path
from deltaconv_core import kernels  # noqa: E402
from deltaconv_core.block import BlockConfig, DeltaConvBlock  # noqa: E402
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
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "pixart": "PixArt-α/Σ"}
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


def available_cpu_bytes() -> int:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def bench(fn, device: str, repeats: int, warmup: int, budget_s: float) -> list[float]:
    """Times fn(). The first warm-up run estimates its cost; warm-up and timed runs are cut to fit budget_s."""
    first = harness.seconds(fn, device)
    for _ in range(warmup - 1 if first * warmup <= budget_s / 2 else 0):
        fn()
    return [harness.seconds(fn, device) for _ in range(max(1, min(repeats, int(budget_s / max(first, 1e-9)))))]


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


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


def torch_ops(fn):
    """fn run with the Triton kernels switched off (the block's PyTorch path)."""
    def run():
        kernels.set_enabled(False)
        try:
            return fn()
        finally:
            kernels.set_enabled(None)  # back to the environment's choice
    return run


def time_attention(name: str, attn: SelfAttention, fn, x: torch.Tensor, device: str, timing: dict) -> dict:
    """One attention baseline on x [B, H, W, C] taken as tokens: its record keys (median, times, peak memory, or
    the error that stopped it). On the CPU, SDPA materialises the B·heads·N² scores: not run when they would not
    fit. On CUDA, out of memory (or a kernel refusing the shape, e.g. SageAttention's head sizes) is recorded."""
    b, n, c = x.shape[0], x.shape[1] * x.shape[2], x.shape[3]
    result = {f"{name}_median_ms": None, f"{name}_times_ms": None, f"{name}_peak_bytes": None, f"{name}_error": None}
    if device != "cuda" and b * attn.heads * n * n * x.element_size() > 0.9 * available_cpu_bytes():
        return {**result, f"{name}_error": "did not fit"}
    run = functools.partial(attn, x.view(b, n, c), fn)
    try:
        times = bench(run, device, **timing)
        return {**result, f"{name}_median_ms": median_ms(times), f"{name}_times_ms": [t * 1e3 for t in times],
                f"{name}_peak_bytes": peak_bytes(run, device)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**result, f"{name}_error": "out of memory"}
    except Exception as e:  # a baseline that fails is a result, not the end of the benchmark
        return {**result, f"{name}_error": f"{type(e).__name__}: {e}"}


def time_mediators(student, x: torch.Tensor, schedules: dict, device: str, timing: dict) -> dict:
    """Mediator attention on x [B, H, W, C], per schedule (record-key prefix → MediatorSchedule): time, MACs and
    peak memory averaged over its sampling steps, each count weighted by its share of them. Each count is timed
    once, whichever schedules share it."""
    b, h, w, c = x.shape
    per_count = {}
    for n in sorted({n for schedule in schedules.values() for n in schedule.distinct_counts()}):
        run = functools.partial(student, x, n)
        student(x, n)  # untimed: the first call at a shape
        per_count[n] = (median_ms(bench(run, device, **timing)), peak_bytes(run, device),
                        b * mediator_macs((h, w), c, n))
    rec = {}
    for name, schedule in schedules.items():
        parts = [(end - start, per_count[n]) for start, end, n in schedule.segments()]
        peaks = [m[1] for _, m in parts]
        rec.update({f"{name}_schedule": schedule.format(), f"{name}_median_ms": sum(f * m[0] for f, m in parts),
                    f"{name}_macs": round(sum(f * m[2] for f, m in parts)),
                    f"{name}_peak_bytes": None if None in peaks else max(peaks)})
    return rec


def measure(families: dict, images, device: str, dtype, batch: int = 1, repeats: int = 7, warmup: int = 2,
            cell_budget: float = 20.0, baselines=None, mediators=None):
    """Yields one record per (family, site, image), families being {name: sites} as in FAMILIES: ΔConv as the
    model runs it (the Triton kernels where they run, then also on PyTorch ops), a device copy of the floor bytes,
    each attention baseline (name → fn(q, k, v, heads); default {"attention": SDPA}, the first gives the speed-up)
    and mediator attention per schedule (default MEDIATORS, {} for none)."""
    mediators = MEDIATORS if mediators is None else mediators
    baselines = baselines or {"attention": sdpa_attention}
    timing = {"repeats": repeats, "warmup": warmup, "budget_s": cell_budget}
    attn_cache, copy_cache = {}, {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for family, label, c, k, per_token, heads in ((f, *site) for f, sites in families.items() for site in sites):
            config = BlockConfig(dim=c, kernel_size=k)
            block = build_student(config, device=device, dtype=dtype).eval()
            attn = SelfAttention(c, heads, device=device, dtype=dtype).eval()
            student = build_student(MediatorConfig(c, heads), device=device, dtype=dtype).eval()
            for image in images:
                g = image // per_token
                n, cell_busy, cell_t0 = g * g, busy_cpu_s(), time.perf_counter()
                x = torch.randn(batch, g, g, c, device=device, dtype=dtype)
                fused = kernels.use_triton(x)  # x's dtype is the gate input's: the block takes the kernels
                block(x)  # untimed: compiles the kernels for this shape, so the first timed run is a real one
                run = functools.partial(block, x)
                d_times = bench(run, device, **timing)
                path = "triton" if fused and kernels.failure() is None else "torch"
                if (c, g) not in copy_cache:  # the floor traffic moved by a plain copy: x read, y written
                    copy_cache[(c, g)] = median_ms(bench(functools.partial(torch.empty_like(x).copy_, x), device,
                                                         **timing))
                rec = {"family": family, "image": image, "site": label, "channels": c, "kernel_size": k,
                       "heads": heads, "grid": g, "tokens": n, "deltaconv_path": path,
                       "kernel_failure": kernels.failure(), "deltaconv_median_ms": median_ms(d_times),
                       "deltaconv_times_ms": [t * 1e3 for t in d_times],
                       "deltaconv_peak_bytes": peak_bytes(run, device), "deltaconv_torch_ops_median_ms":
                           median_ms(bench(torch_ops(run), device, **timing)) if path == "triton" else None,
                       "floor_bytes": 2 * x.numel() * x.element_size(), "copy_median_ms": copy_cache[(c, g)],
                       "deltaconv_macs": batch * DeltaConvBlock.macs(config, (g, g)),
                       "attention_macs": batch * attention_macs(n, c)}
                for name, fn in baselines.items():  # attention does not depend on k: measured once per shape
                    if (name, c, g, heads) not in attn_cache:
                        attn_cache[(name, c, g, heads)] = time_attention(name, attn, fn, x, device, timing)
                    rec.update(attn_cache[(name, c, g, heads)])
                rec.update(time_mediators(student, x, mediators, device, timing))
                first = rec[f"{next(iter(baselines))}_median_ms"]
                cell_s = time.perf_counter() - cell_t0
                load = foreign_load(cell_busy, cell_s)
                # /proc/stat counts 10 ms ticks: flag (⚠) only > 5 % of the cores and > 0.1 CPU-s of other work
                busy = load is not None and load > 5 and load / 100 * cell_s * (os.cpu_count() or 1) > 0.1
                rec.update({"speedup": None if first is None else first / rec["deltaconv_median_ms"],
                            "mac_ratio": rec["attention_macs"] / rec["deltaconv_macs"],
                            "other_processes_cpu_pct": load, "contaminated": busy})
                shown = ("deltaconv", *baselines, *mediators)
                print(f"{family} {image}² {label} ({path}): " + ", ".join(
                    f"{name} " + (rec.get(f"{name}_error") or "?" if rec[f"{name}_median_ms"] is None else
                                  f"{rec[f'{name}_median_ms']:.2f} ms") for name in shown), flush=True)
                yield rec


# ------------------------------------------------------------------------------------------------------- report
def glance(rows: list[dict]) -> str:
    """Per family and image size, the range of ΔConv's speed-up over attention across the family's sites."""
    images, cells = sorted({r["image"] for r in rows}), []
    for family in dict.fromkeys(r["family"] for r in rows):
        line = [FAMILY_NAMES.get(family, family)]
        for image in images:
            cell = [r for r in rows if r["family"] == family and r["image"] == image]
            ups = [r["speedup"] for r in cell if r.get("speedup") is not None]
            if not ups:
                line.append("attention did not fit" if cell else "—")
                continue
            span = f"{min(ups):.1f}×" if min(ups) == max(ups) else f"{min(ups):.1f}×–{max(ups):.1f}×"
            line.append(span + (" (other sites: attention did not fit)" if len(ups) < len(cell) else ""))
        cells.append(line)
    return harness.table(["family", *(f"{i}²" for i in images)], cells)


def floor_ratio(r: dict) -> float:
    """ΔConv's time over the time a device copy takes to move the block's floor bytes (x read, y written)."""
    return r["deltaconv_median_ms"] / r["copy_median_ms"]


def columns(rows: list[dict], baselines: list[str], mediators: dict, family: bool = False) -> list:
    """The (header, cell) columns of a table of these rows: ΔConv (also on PyTorch ops where it ran on the kernels),
    each attention baseline, mediator attention per schedule, and on CUDA the path, the time over the bandwidth
    floor and peak memory."""
    cell = harness.cell
    baseline = lambda n: lambda r: (r.get(f"{n}_error") or "did not fit" if r.get(f"{n}_median_ms") is None
                                    else f"{r[f'{n}_median_ms']:.2f}")
    found = [*[("family", lambda r: FAMILY_NAMES.get(r["family"], r["family"]))] * family,
             ("site", lambda r: r["site"]), ("C", lambda r: str(r["channels"])), ("k", lambda r: str(r["kernel_size"])),
             ("image", lambda r: f"{r['image']}²"), ("grid (tokens)", lambda r: f"{r['grid']}² ({r['grid'] ** 2})"),
             ("ΔConv ms", cell("deltaconv_median_ms")),
             *[("ΔConv on PyTorch ops ms", cell("deltaconv_torch_ops_median_ms"))]
             * any(r.get("deltaconv_torch_ops_median_ms") is not None for r in rows),
             *((f"{n} ms", baseline(n)) for n in baselines),
             ("speed-up", lambda r: cell("speedup", "{:.1f}×")(r) + " ⚠" * bool(r.get("contaminated"))),
             ("ΔConv GMAC", cell("deltaconv_macs", "{:.3f}", 1e9)),
             ("attention GMAC", cell("attention_macs", "{:.3f}", 1e9)), ("MAC ratio", cell("mac_ratio", "{:.1f}×")),
             *((f"mediators {s} ms (GMAC)", lambda r, m=m: f"{r[f'{m}_median_ms']:.2f} ({r[f'{m}_macs'] / 1e9:.3f})")
               for m, s in mediators.items())]
    if any(r.get("deltaconv_peak_bytes") is not None for r in rows):  # CUDA
        peaks = ("deltaconv", *baselines, *mediators)
        found += [("path", lambda r: r["deltaconv_path"]), ("floor ratio", lambda r: f"{floor_ratio(r):.2f}×"),
                  ("copy GB/s", lambda r: f"{r['floor_bytes'] / r['copy_median_ms'] / 1e6:.3g}"),
                  ("peak MiB " + " / ".join(("ΔConv", *baselines, *mediators.values())), lambda r: " / ".join(
                      cell(f"{k}_peak_bytes", "{:.0f}", 2**20)(r) for k in peaks))]
    return found


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    paths = {"torch": "PyTorch ops", "triton": "fused Triton kernels (also timed on PyTorch ops)"}
    lines = [f"precision: {meta['dtype']}, batch {meta['batch']}; ΔConv on "
             + " and ".join(paths[p] for p in meta["deltaconv_path"])
             + (f" (the Triton kernels failed: {meta['kernel_failure']})" if meta.get("kernel_failure") else ""),
             f"timing: medians of up to {meta['repeats']} timed runs after up to {meta['warmup']} warm-up runs, "
             f"cut to fit ~{meta['cell_budget']:g} s per cell"]
    parts = [harness.header(f"Block level on {meta['device']}: {', '.join(FAMILY_NAMES.get(f, f) for f in families)}",
                            meta, *lines), "## At a glance", "",
             f"Speed-up of ΔConv over attention across each family's self-attention sites ({meta['dtype']}, batch "
             f"{meta['batch']}):", "", glance(rows)]
    for family in families:
        cells = [r for r in rows if r["family"] == family]
        parts += ["", f"## {FAMILY_NAMES.get(family, family)} layer shapes", "",
                  harness.columns_table(columns(cells, meta["baselines"], meta["mediators"]), cells)]
    return "\n".join(parts) + "\n"


def main():
    p = harness.parser(__doc__, threads=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cell-budget", type=float, default=20.0, help="max seconds of timed runs per cell (repeats adapt)")
    p.add_argument("--families", default="sd15,sdxl,pixart", help="comma-separated: " + ", ".join(FAMILIES))
    p.add_argument("--images", default=",".join(map(str, IMAGES)),
                   help="comma-separated image sizes; each site's token grid follows from it (default: %(default)s)")
    p.add_argument("--variant", default="", help="results named block_<variant>_<device> (beside a full run)")
    args = harness.parse(p)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    run = harness.Run(__file__)
    rows = list(measure({f: FAMILIES[f] for f in args.families.split(",")}, [int(i) for i in args.images.split(",")],
                        args.device, dtype, args.batch, args.repeats, args.warmup, args.cell_budget))
    meta = run.meta(device_name(args.device), dtype=str(dtype)[6:], batch=args.batch,
                    repeats=args.repeats, warmup=args.warmup, cell_budget=args.cell_budget,
                    deltaconv_path=sorted({r["deltaconv_path"] for r in rows}), kernel_failure=kernels.failure(),
                    baselines=["attention"], mediators={k: s.format() for k, s in MEDIATORS.items()})
    result = {"meta": meta, "rows": rows}
    name = "_".join(filter(None, ("block", args.variant, device_slug(args.device))))
    harness.write(args.out, name, result, markdown(result))


if __name__ == "__main__":
    main()
