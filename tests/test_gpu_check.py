"""bench/gpu_check.py's smoke mode: every stage's code on the CPU with tiny shapes (the kernels in Triton's
interpreter), the report written; no speed is judged. In subprocesses: the check sets TRITON_INTERPRET before
triton is imported and puts ComfyUI's modules in place itself."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("kernels", "block", "unet", "distill")
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
