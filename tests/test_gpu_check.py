"""bench/gpu_check.py's smoke mode: every stage's code on the CPU with tiny shapes (the kernels in Triton's
interpreter), the report written; no speed is judged. In subprocesses: the check sets TRITON_INTERPRET before
triton is imported and puts ComfyUI's modules in place itself."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("kernels", "block", "wan", "unet", "distill")
# ComfyUI before mid-2024 adds residuals in place: stage B cannot backpropagate there (README, Limitations)
KNOWN_LIMITATION = "cannot backpropagate through this ComfyUI"


def run_check(out, comfy_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DELTACONV_TRITON")}
    env["COMFYUI_PATH"] = str(comfy_path)
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--smoke", "--out", str(out),
                             *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    reports = sorted(out.glob("gpu_*.json"))
    assert len(reports) == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert reports[0].with_suffix(".md").is_file()
    return result, json.loads(reports[0].read_text()), reports[0].with_suffix(".md").read_text()


def test_smoke_measures_every_stage_and_writes_the_report(tmp_path, comfy_path):
    result, report, markdown = run_check(tmp_path, comfy_path)
    assert set(report["stages"]) == set(STAGES)
    for name, stage in report["stages"].items():
        assert stage["rows"], f"{name}: no rows ({stage['error']})"
        assert not any("skipped" in r for r in stage["rows"]), name
        assert f"## {name}" in markdown
    errors = [r["error"] for s in report["stages"].values() for r in s["rows"] if "error" in r]
    assert all(KNOWN_LIMITATION in e for e in errors), errors
    assert result.returncode == (1 if errors else 0), result.stderr[-3000:]
    assert all(r["passed"] and r["path"] == "triton" for r in report["stages"]["kernels"]["rows"])
    assert report["environment"]["torch"] and report["environment"]["triton"] != "not installed"
    statuses = {t["target"]: t["status"] for t in report["targets"]}
    assert statuses["kernel correctness: every case passes"] == "met"
    assert set(statuses.values()) <= {"met", "missed", "not measured"}
    assert "| target | required | measured | status |" in result.stdout


def test_a_failing_stage_is_reported_and_the_next_one_still_runs(tmp_path):
    """No ComfyUI where COMFYUI_PATH points: both stages fail on their own, the report still comes out."""
    result, report, markdown = run_check(tmp_path / "out", tmp_path / "no-comfyui", "--only", "unet,distill")
    assert result.returncode == 1
    assert list(report["stages"]) == ["unet", "distill"]
    for name, stage in report["stages"].items():
        assert stage["status"] == "failed" and "No ComfyUI" in stage["error"], stage
        assert f"## {name}\n\n- status: failed" in markdown


def test_wan_rows_show_the_models_estimate_beside_each_measurement():
    """The wan stage's table: each measured row with the committed estimate for its GPU class; a row that was not
    measured says why."""
    import bench_wan
    import gpu_check

    h200, h100 = gpu_check.wan_predictions("NVIDIA H200"), gpu_check.wan_predictions("NVIDIA H100 80GB HBM3")
    assert set(h200) == {(m, r) for m in bench_wan.MODELS for r in bench_wan.RESOLUTIONS} and h200 != h100
    row = {"model": "1.3B", "resolution": "720p", "frames": 81, "grid": [21, 45, 80], "tokens": 75600,
           "channels": 1536, "attention_macs": 18_271_037_030_400, "mediators_macs": 744_571_699_200,
           "deltaconv_macs": 182_079_737_856, "attention_median_ms": 80.0, "mediators_median_ms": 8.0,
           "deltaconv_median_ms": 2.0, "mediators_speedup": 10.0, "deltaconv_speedup": 40.0,
           "attention_peak_bytes": 2**30, "mediators_peak_bytes": 2**31, "deltaconv_peak_bytes": 2**29}
    table = gpu_check.stage_table("wan", [row, {"model": "14B", "resolution": "720p", "frames": 81,
                                                "error": "out of memory"}], "NVIDIA H200")
    p = h200["1.3B", "720p"]
    estimate = (f"{p['attention_ms'][0]:.2f}–{p['attention_ms'][1]:.2f} / {p['mediators_ms'][0]:.2f} / "
                f"{p['deltaconv_ms'][0]:.2f}")
    assert (f"| 1.3B | 720p, 81 frames | 21×45×80 (75,600) | 80.00 | 8.00 | 2.00 | 10.0× | 40.0× | 18,271.0 | "
            f"744.6 | 182.1 | {estimate} | 1024 / 2048 / 512 |") in table
    assert "| 14B | 720p, 81 frames | — |" in table and "| error: out of memory |" in table
