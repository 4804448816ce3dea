"""What the benchmarks share: their common arguments, a timer, the `meta` block of a run and the results files.

Each benchmark writes <out>/<name>.json = {"meta": {...}, ...its data} and <name>.md, its own report: a header made
from meta, then its tables (an "## At a glance" section first where it has headline figures). meta holds benchmark
(the script's name), command, date, device, torch, threads, the benchmark's own settings, seconds,
foreign_load_pct (the share of all cores other processes used during the run: a loaded host skews timings, and the
benchmarks page keeps such runs out of its headline figures) and load_average (before and after, Unix only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
import torch

from devkit.device_info import busy_cpu_s, foreign_load, load_average

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str, threads: bool = False) -> argparse.ArgumentParser:
    """An argument parser showing the script's docstring, with --out (and --threads for CPU timings)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    if threads:
        p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


class Run:
    """Started before measuring: the clock, the load average and the CPU time other processes have used so far."""

    def __init__(self, script: str):
        self.script = Path(script).name
        self.started, self.busy, self.load = time.perf_counter(), busy_cpu_s(), load_average()

    def meta(self, device: str, **settings) -> dict:
        """The run's meta block, taken when its measurements are done."""
        seconds = time.perf_counter() - self.started
        load = foreign_load(self.busy, seconds)
        return {"benchmark": Path(self.script).stem, "command": shlex.join(["python", f"bench/{self.script}",
                                                                            *sys.argv[1:]]),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), **settings,
                "seconds": round(seconds), "foreign_load_pct": None if load is None else round(load, 1),
                "load_average": [self.load, load_average()]}


def seconds(fn, device: str) -> float:
    """Seconds of one fn() call: CUDA events on the GPU, the wall clock on the CPU."""
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


def header(title: str, meta: dict, *lines: str) -> str:
    """A report's title and the lines every report starts with (from its meta), then its own `lines`."""
    load = meta.get("foreign_load_pct")
    took = "" if meta.get("seconds") is None else f" ({meta['seconds']} s)"
    threads = f", {meta['threads']} thread{'s' * (meta['threads'] != 1)}" if meta.get("threads") else ""
    torch_version = f", torch {meta['torch']}" if meta.get("torch") else ""
    bullets = [f"command: `{meta['command']}`", f"device: {meta['device']}{threads}{torch_version}",
               f"date: {meta['date']}{took}", "host load: other processes used " + (
                   "an unrecorded share" if load is None else f"{load:g}%") + " of all cores during the run", *lines]
    return "\n".join([f"# {title}", "", *(f"- {b}" for b in bullets), ""])


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def cell(key: str, fmt: str = "{:.2f}", scale: float = 1.0):
    """A column's cell: row[key] / scale formatted, or — when the row has none."""
    return lambda r: "—" if r.get(key) is None else fmt.format(r[key] / scale)


def columns_table(columns: list, rows: list[dict], ids: int = 0) -> str:
    """A table of (header, cell) columns. A row that was not measured carries "error" or "skipped" instead of
    numbers (the GPU check's): its first `ids` cells name it, its last says what happened."""
    cells = []
    for r in rows:
        note = next((f"{k}: {r[k]}" for k in ("error", "skipped") if k in r), None)
        cells.append([c(r) for _, c in columns] if note is None else
                     [c(r) for _, c in columns[:ids]] + ["—"] * (len(columns) - ids - 1) + [note])
    return table([h for h, _ in columns], cells)


def write(out: Path, name: str, result: dict, report: str) -> None:
    """<out>/<name>.json (the result, its meta first) and <name>.md (the report)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(report, encoding="utf-8")
    print(f"\n{report}\nwrote {out / name}.json and .md", flush=True)
