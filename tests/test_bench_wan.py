"""bench/bench_wan.py: Wan's token grids, MACs counted op by op (bench/op_count.py) against explicit formulas and
against torch's own FLOP counter on real forwards, the committed table against a recount (so it cannot drift from
the code), every target judged from its numbers, and the timed path on a tiny shape."""
import json
import math
from pathlib import Path

import bench_wan
import op_count
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
COMMITTED = RESULTS / "wan_macs_model.json"


def test_token_grids_of_wan_videos():
    assert bench_wan.token_grid(81, 480, 832) == (21, 30, 52)
    assert bench_wan.token_grid(81, 720, 1280) == (21, 45, 80)
    assert bench_wan.token_grid(1, 480, 832) == (1, 30, 52)
    for bad in ((80, 480, 832), (81, 480, 840), (0, 480, 832)):
        with pytest.raises(ValueError, match="4k\\+1 frames"):
            bench_wan.token_grid(*bad)


def explicit_macs(grid, c: int, mediator_cells: int, k: int = 7, k_t: int = 3) -> dict:
    """Written out from the modules: attention q/k/v/o + QKᵀ + AV; mediator attention q/k/v/o, the two attentions
    through n cells, 3×3 + 3-tap DWC; ΔConv conv_up, conv_time, conv_out (two branches of C/4), k×k depthwise at
    full size and on each frame's ⌊h/2⌋×⌊w/2⌋ pooled grid, conv_pool once."""
    t, h, w = grid
    n = t * h * w
    return {"attention": 4 * n * c * c + 2 * n * n * c,
            "mediators": 4 * n * c * c + 4 * mediator_cells * n * c + 12 * n * c,
            "deltaconv": n * (c * c // 2 + k_t * c // 2 + 2 * (c // 4) * c)
                         + k * k * (c // 2) * t * (h * w + (h // 2) * (w // 2)) + c * c}


@pytest.mark.parametrize("model,resolution", [(m, r) for m in bench_wan.MODELS for r in bench_wan.RESOLUTIONS])
def test_counted_macs_at_wan_shapes_equal_the_explicit_formulas(model, resolution):
    row = bench_wan.mac_row(model, resolution)
    expected = explicit_macs(tuple(row["grid"]), row["channels"], math.prod(row["mediator_grid"]))
    assert {name: row[f"{name}_macs"] for name in bench_wan.STUDENTS} == expected
    # the students' own `macs` (the reports' figures) agree, also at 720p's odd 45-patch height
    assert {name: row[f"{name}_own_macs"] for name in bench_wan.STUDENTS} == expected


@pytest.mark.parametrize("grid", [(3, 6, 10), (2, 5, 7)])
def test_the_count_is_what_a_real_forward_runs(grid):
    """On real tensors: op_count equals the meta-device count, and torch's FlopCounterMode plus the one op it leaves
    out (ΔConv's in-place second branch, N·C/4·C); odd h and w pool to ⌊h/2⌋×⌊w/2⌋."""
    shape = bench_wan.WanShape(32, 4, 1)
    n, c = math.prod(grid), shape.dim
    torch.manual_seed(0)
    real = bench_wan.forwards(bench_wan.modules(shape), torch.randn(1, *grid, c))
    with torch.device("meta"):
        meta = bench_wan.forwards(bench_wan.modules(shape), torch.empty(1, *grid, c))
    for name in bench_wan.STUDENTS:
        counted = op_count.macs(real[name])
        assert counted == op_count.macs(meta[name]), name
        # SDPA's math path: torch's counter has no formula for the CPU's fused SDPA kernel
        with FlopCounterMode(display=False) as torch_count, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            real[name]()
        missed = n * (c // 4) * c if name == "deltaconv" else 0
        assert counted == torch_count.get_total_flops() // 2 + missed, name
    cells = math.prod(bench_wan.pooled_grid(bench_wan.MEDIATORS, grid))
    assert {name: op_count.macs(meta[name]) for name in bench_wan.STUDENTS} == explicit_macs(grid, c, cells)


def test_the_committed_table_is_a_recount():
    data = json.loads(COMMITTED.read_text())
    recount = json.loads(json.dumps(bench_wan.count_and_model()))  # as written: tuples become lists
    assert [(r["model"], r["resolution"]) for r in data["rows"]] == [
        (m, r) for m in bench_wan.MODELS for r in bench_wan.RESOLUTIONS], "a row is missing: rerun bench_wan.py"
    assert data["rows"] == recount["rows"] and data["model"] == recount["model"], \
        "bench/results/wan_macs_model.json is stale: rerun python bench/bench_wan.py"
    assert data["meta"]["estimate"] is True


def test_every_target_is_judged_from_its_numbers():
    data = json.loads(COMMITTED.read_text())
    report = bench_wan.count_markdown(data)
    for (model, resolution), needs in bench_wan.TARGETS.items():
        row = next(r for r in data["rows"] if (r["model"], r["resolution"]) == (model, resolution))
        for name, need in zip(("mediators", "deltaconv"), needs):
            value = row[f"{name}_reduction"]
            assert f"{value:.1f}× (≥ {need:g}×: {'met' if value >= need else 'missed'})" in report
        # mediator attention keeps q/k/v/o: it can never beat attention / 4NC² = 1 + N/2C
        assert row["mediators_reduction"] < row["projection_bound"] == pytest.approx(
            1 + row["tokens"] / (2 * row["channels"]))
    flipped = {**data, "rows": [{**r, "deltaconv_reduction": 1.0} for r in data["rows"]]}
    assert "1.0× (≥ 40×: missed)" in bench_wan.count_markdown(flipped)


def test_the_model_prices_attention_as_the_gpu_model_does():
    """Attention's recorded ops priced op by op: the GPU model's attention_us (SDPA + projections) plus the q/k
    norms and the copy after SDPA, a few DRAM passes."""
    import gpu_model

    data = json.loads(COMMITTED.read_text())
    d = gpu_model.DEVICES["h200"]
    for p in (p for p in data["model"] if p["device"] == d.name):
        row = next(r for r in data["rows"] if (r["model"], r["resolution"]) == (p["model"], p["resolution"]))
        plain = gpu_model.attention_us(row["channels"], row["tokens"], 1, d)
        passes = 3 * row["tokens"] * row["channels"] * 2 * 2 / (d.bandwidth_tbs * 1e6)  # norms, copy: in + out
        for got, base in zip(p["attention_ms"], plain):
            assert base / 1e3 < got <= (base + passes + 1.0) / 1e3, (p, base)
        assert all(s > 1 for s in p["deltaconv_speedup"] + p["mediators_speedup"]), p


def test_timed_rows_on_a_tiny_shape(monkeypatch):
    tiny = {"tiny": bench_wan.WanShape(16, 2, 1)}
    rows = list(bench_wan.measure(tiny, {"64²": (64, 64)}, 5, "cpu", torch.float32, repeats=1, warmup=1,
                                  cell_budget=0.1))
    assert len(rows) == 1 and rows[0]["grid"] == [2, 4, 4]
    assert all(rows[0][f"{n}_median_ms"] > 0 for n in bench_wan.STUDENTS), rows
    assert rows[0]["deltaconv_speedup"] == rows[0]["attention_median_ms"] / rows[0]["deltaconv_median_ms"]
    monkeypatch.setattr(bench_wan.bench_block, "available_cpu_bytes", lambda: 0)
    row = next(bench_wan.measure(tiny, {"64²": (64, 64)}, 5, "cpu", torch.float32, 1, 1, 0.1))
    assert row["attention_error"] == "did not fit" and row["deltaconv_median_ms"] > 0
    assert row["deltaconv_speedup"] is None
    meta = {"benchmark": "bench_wan", "command": "python bench/bench_wan.py --device cpu", "date": "today",
            "device": "a CPU", "dtype": "float32", "repeats": 1, "warmup": 1, "cell_budget": 0.1}
    report = bench_wan.timed_markdown({"meta": meta, "rows": rows + [row]})
    assert "| tiny | 64², 5 frames | 2×4×4 (32) |" in report and "| did not fit |" in report
