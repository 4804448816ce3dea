"""Fills the generated parts of docs/benchmarks.md with the benchmarks' own reports from bench/results/.

    python scripts/make_benchmarks_doc.py            # rewrite the generated parts of docs/benchmarks.md
    python scripts/make_benchmarks_doc.py --check    # exit 1 when they are out of date

The page is written by hand but for its regions `<!-- results: NAME -->` … `<!-- end results -->`. NAME is a
benchmark script (bench/NAME.py): the region gets the .md report of each of its results, in file-name order, under a
heading that links the results file. NAME `glance`: the "At a glance" section of every report from a run on a host
that was not loaded (other processes used at most MAX_FOREIGN_LOAD % of the cores): a loaded run stays on the page,
marked, but never gives a headline figure. Every results file must land on the page. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH, PAGE = REPO / "bench", REPO / "docs" / "benchmarks.md"
RESULTS = BENCH / "results"
MAX_FOREIGN_LOAD = 20.0  # % of all cores other processes used during a run, above which it is no headline number
REGION = re.compile(r"(<!-- results: (\w+) -->\n).*?(<!-- end results -->)", re.DOTALL)
GLANCE = "## At a glance"


def reports(results: Path) -> list[tuple[Path, dict, str]]:
    """(results file, its meta block, its report) for every bench/results/*.json, by name."""
    found = []
    for path in sorted(results.glob("*.json")):
        meta = json.loads(path.read_text(encoding="utf-8")).get("meta")
        report = path.with_suffix(".md")
        if not isinstance(meta, dict) or "benchmark" not in meta or not report.is_file():
            raise ValueError(f"{path.name}: no meta block naming its benchmark, or no report beside it: rerun it")
        found.append((path, meta, report.read_text(encoding="utf-8")))
    return found


def loaded(meta: dict) -> bool:
    return (meta.get("foreign_load_pct") or 0.0) > MAX_FOREIGN_LOAD


def split(report: str) -> tuple[str, str, str]:
    """(title, At a glance section, the rest) of a report."""
    title, _, body = report.partition("\n")
    sections = re.split(r"(?m)^(?=## )", body)
    glance = next((s for s in sections if s.startswith(GLANCE)), "")
    rest = "".join(s for s in sections if s is not glance)
    return title.removeprefix("# "), glance.removeprefix(GLANCE).strip(), rest.strip()


def link(path: Path) -> str:
    return f"[`{path.name}`](../bench/results/{path.name})"


def region(name: str, found: list) -> str:
    if name == "glance":
        return "\n\n".join(f"**{title}** ({link(path)}):\n\n{glance}" for path, meta, report in found
                           if not loaded(meta) for title, glance, _ in [split(report)] if glance)
    if not (BENCH / f"{name}.py").is_file():
        raise ValueError(f"docs/benchmarks.md has a region for {name!r}, which is no script in bench/")
    parts = []
    for path, meta, report in (r for r in found if r[1]["benchmark"] == name):
        title, _, rest = split(report)
        mark = (f"\n\n⚠ **Loaded host**: other processes used {meta['foreign_load_pct']:g}% of the cores (more "
                f"than {MAX_FOREIGN_LOAD:g}%), so these timings are no headline numbers: kept for the record, left "
                "out of At a glance." if loaded(meta) else "")
        parts.append(f"### {title} ({link(path)}){mark}\n\n" + re.sub(r"(?m)^(#+) ", r"\1## ", rest))
    return "\n\n".join(parts) or "*No results yet.*"


def render(page: str, results: Path = RESULTS) -> str:
    """The page with every region filled from the results."""
    found = reports(results)
    missing = {meta["benchmark"] for _, meta, _ in found} - {m[2] for m in REGION.finditer(page)}
    if missing:
        raise ValueError(f"results of {sorted(missing)} but no region for them on docs/benchmarks.md")
    return REGION.sub(lambda m: f"{m[1]}\n{region(m[2], found)}\n\n{m[3]}", page)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md differs from what it would be")
    check = p.parse_args().check
    current = PAGE.read_text(encoding="utf-8")
    text = render(current)
    if check:
        stale = text != current
        print("docs/benchmarks.md is " + ("out of date: run python scripts/make_benchmarks_doc.py" if stale else
                                          "up to date"), file=sys.stderr if stale else sys.stdout)
        return int(stale)
    PAGE.write_text(text, encoding="utf-8")
    print("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
