"""The GPU check's report: its targets judged from the stages' rows, and the Markdown tables.

A stage result is {"status", "seconds", "error", "notes", "rows"}; a row that was not measured carries "error" (it
raised) or "skipped" (the stage's time ran out, or an earlier step failed) instead of numbers.
"""
from __future__ import annotations

UNET_SPEEDUPS = [("sd15", 512, 1.3), ("sd15", 1024, 2.5), ("sd15", 2048, 5.0), ("sdxl", 1024, 1.3), ("sdxl", 2048, 3.0)]
FLOOR_IMAGE, FLOOR_RATIO = 4096, 1.5  # the block within 1.5× of one read of x + one write of y at copy speed
FAMILIES = ("sd15", "sdxl", "pixart")
NOTES = ("error", "skipped")


def measured(rows) -> list[dict]:
    return [r for r in rows if not any(k in r for k in NOTES)]


def floor_ratio(r: dict) -> float:
    """ΔConv's time over the time a device copy takes to move the block's floor bytes (x read, y written)."""
    return r["deltaconv_median_ms"] / r["copy_median_ms"]


def target(name: str, required: str, value: float | None, met: bool, shown: str) -> dict:
    if value is None:
        return {"target": name, "required": required, "measured": "not measured", "status": "not measured"}
    return {"target": name, "required": required, "measured": shown, "status": "met" if met else "missed"}


def kernel_targets(rows) -> list[dict]:
    if not rows:
        return [target("kernel correctness: every case passes", "all", None, False, "")]
    passed = sum(r.get("passed") is True for r in rows)
    return [target("kernel correctness: every case passes", "all", passed, passed == len(rows),
                   f"{passed}/{len(rows)} pass")]


def block_targets(rows) -> list[dict]:
    found = []
    done = measured(rows)
    for family in FAMILIES:
        cells = [r for r in done if r["family"] == family and r["image"] == FLOOR_IMAGE]
        worst = max(cells, key=floor_ratio, default=None)
        ratio = worst and floor_ratio(worst)
        found.append(target(f"block {family} {FLOOR_IMAGE}²: ΔConv time / bandwidth floor (worst site)",
                            f"≤ {FLOOR_RATIO}×", ratio, worst and ratio <= FLOOR_RATIO,
                            worst and f"{ratio:.2f}× ({worst['site']}, {worst['deltaconv_path']})"))
    for image in sorted({r["image"] for r in done}):
        ratios = [(r["deltaconv_peak_bytes"] / r["attention_peak_bytes"], r) for r in done if r["image"] == image
                  and r["deltaconv_peak_bytes"] is not None and r.get("attention_peak_bytes")]
        worst = max(ratios, key=lambda pair: pair[0], default=None)
        found.append(target(f"block {image}²: peak memory ΔConv / attention (worst site)", "≤ 1×",
                            worst and worst[0], worst and worst[0] <= 1,
                            worst and f"{worst[0]:.2f}× ({worst[1]['family']} {worst[1]['site']})"))
    return found


def unet_targets(rows) -> list[dict]:
    done = {(r["model"], r["size"]): r for r in measured(rows)}
    found = []
    for model, size, need in UNET_SPEEDUPS:
        speedup = done.get((model, size), {}).get("speedup")
        found.append(target(f"UNet step {model} {size}²: ΔConv vs ComfyUI attention", f"≥ {need}×", speedup,
                            speedup is not None and speedup >= need, f"{speedup or 0:.2f}×"))
    for (model, size), r in done.items():
        a, d = r.get("attention_peak_mib"), r.get("deltaconv_peak_mib")
        if a is not None and d is not None:  # CUDA only
            found.append(target(f"UNet step {model} {size}²: peak memory ΔConv / attention", "≤ 1×", d / a, d <= a,
                                f"{d:.0f} / {a:.0f} MiB"))
    return found


TARGETS = {"kernels": kernel_targets, "block": block_targets, "unet": unet_targets}


def targets(stages: dict) -> list[dict]:
    """Every target, judged from the stages that ran; a stage that did not run leaves its targets not measured."""
    return [t for name, judge in TARGETS.items() for t in judge(stages.get(name, {}).get("rows", []))]


# ------------------------------------------------------------------------------------------------ Markdown tables
def ms(key):
    return lambda r: "—" if r.get(key) is None else f"{r[key]:.2f}"


def mib(key, scale=2**20):
    return lambda r: "—" if r.get(key) is None else f"{r[key] / scale:.0f}"


def baseline_ms(name):
    """A baseline's median ms, its error, "skipped", or — when it was not part of the run (not installed)."""
    def cell(r):
        if f"{name}_median_ms" not in r:
            return "—"
        return r[f"{name}_error"] or ("skipped" if r[f"{name}_median_ms"] is None else f"{r[f'{name}_median_ms']:.2f}")
    return cell


def times(key, unit=""):
    return lambda r: "—" if r.get(key) is None else f"{r[key]:.3g}{unit}"


# (header, cell) per column; the first `ids` columns name the row and are filled in for unmeasured rows too
COLUMNS = {
    "kernels": (1, [("case", lambda r: r["case"]), ("path", lambda r: r["path"]),
                    ("forward error", lambda r: f"{r['forward_error']:.1e}"),
                    ("worst gradient error", lambda r: f"{r['worst_gradient_error']:.1e} ({r['worst_gradient']})"),
                    ("tolerance", lambda r: f"{r['tolerance']:.0e}"),
                    ("result", lambda r: "pass" if r["passed"] else "FAIL")]),
    "block": (6, [("family", lambda r: r["family"]), ("image", lambda r: f"{r['image']}²"),
                  ("site", lambda r: r["site"]),
                  ("C", lambda r: str(r.get("channels", ""))), ("k", lambda r: str(r.get("kernel_size", ""))),
                  ("grid", lambda r: f"{r['grid']}²" if "grid" in r else ""),
                  ("ΔConv ms", ms("deltaconv_median_ms")), ("path", lambda r: r["deltaconv_path"]),
                  ("ΔConv torch ops ms", ms("deltaconv_torch_ops_median_ms")),
                  ("ComfyUI attention ms", baseline_ms("attention")), ("SageAttention ms", baseline_ms("sage")),
                  ("mediators ms n=16 / 64 / schedule", lambda r: " / ".join(
                      ms(f"mediators_{k}_median_ms")(r) for k in ("n16", "n64", "schedule"))),
                  ("speed-up", times("speedup", "×")), ("floor ratio", lambda r: f"{floor_ratio(r):.2f}×"),
                  ("copy GB/s", times("copy_gbps")),
                  ("peak MiB ΔConv / attention / sage / mediators n=64", lambda r: " / ".join(
                      mib(k)(r) for k in ("deltaconv_peak_bytes", "attention_peak_bytes", "sage_peak_bytes",
                                          "mediators_n64_peak_bytes")))]),
    "unet": (2, [("model", lambda r: r["model"]), ("image", lambda r: f"{r['size']}²"),
                 ("sites", lambda r: str(r["sites"])), ("attention step s", times("attention_s")),
                 ("ΔConv step s", times("deltaconv_s")), ("speed-up", times("speedup", "×")),
                 ("model's speed-up (estimate)", lambda r: r.get("model_speedup", "")),
                 ("attn1 removed step s", times("removed_s")), ("ceiling", times("ceiling", "×")),
                 ("mediators step s", times("mediators_s")), ("mediators speed-up", times("mediators_speedup", "×")),
                 ("peak MiB attention", mib("attention_peak_mib", 1)),
                 ("peak MiB ΔConv", mib("deltaconv_peak_mib", 1)),
                 ("peak MiB mediators", mib("mediators_peak_mib", 1))]),
    "distill": (1, [("stage", lambda r: r["stage"]), ("steps/s", times("steps_per_s")),
                    ("samples/s", times("samples_per_s")),
                    ("peak MiB", lambda r: f"{r['peak_mib']:.0f} ({r['peak_kind']})"),
                    ("10 000 steps", lambda r: f"{10_000 / r['steps_per_s'] / 60:.0f} min")]),
}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def stage_table(name: str, rows: list[dict]) -> str:
    ids, columns = COLUMNS[name]
    cells = []
    for r in rows:
        note = next((f"{k}: {r[k]}" for k in NOTES if k in r), None)
        if note is None:
            cells.append([cell(r) for _, cell in columns])
        else:
            cells.append([cell(r) for _, cell in columns[:ids]] + ["—"] * (len(columns) - ids - 1) + [note])
    return table([h for h, _ in columns], cells)


def targets_table(found: list[dict]) -> str:
    return table(["target", "required", "measured", "status"],
                 [[t["target"], t["required"], t["measured"], t["status"]] for t in found])


def markdown(title: str, meta: dict, environment: dict, stages: dict, found: list[dict]) -> str:
    parts = [f"# {title}", "", *(f"- {k}: {v}" for k, v in meta.items()), "", "## Targets", "", targets_table(found),
             "", "## Environment", "", table(["", ""], [[k, str(v)] for k, v in environment.items()])]
    for name, result in stages.items():
        status = f"{result['status']} in {result['seconds']:.0f} s"
        parts += ["", f"## {name}", "", f"- status: {status}" + (f" — {result['error']}" if result["error"] else "")]
        parts += [f"- {note}" for note in result["notes"]]
        if result["rows"]:
            parts += ["", stage_table(name, result["rows"])]
    return "\n".join(parts) + "\n"
