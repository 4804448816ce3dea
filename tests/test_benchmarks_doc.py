"""docs/benchmarks.md is hand-written around regions that scripts/make_benchmarks_doc.py fills with the benchmarks' own
reports from bench/results: the committed page must be what the script makes of the committed results, every
results file must be on it with its run's meta block, and a run on a loaded host must never give a headline figure.
The script needs neither torch nor ComfyUI."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_benchmarks_doc.py"
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"


def load_script():
    spec = importlib.util.spec_from_file_location("make_benchmarks_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def results(tmp_path):
    """A copy of the committed results to add to."""
    shutil.copytree(RESULTS, tmp_path / "results")
    return tmp_path / "results"


def test_committed_page_equals_what_the_results_generate():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, (result.stderr + "\nRegenerate it: python scripts/make_benchmarks_doc.py "
                                    "(and edit docs/benchmarks.md by hand only outside its results regions)")


def test_every_result_has_its_meta_and_is_on_the_page_and_every_link_resolves():
    text = DOC.read_text(encoding="utf-8")
    for path in sorted(RESULTS.glob("*.json")):
        meta = json.loads(path.read_text(encoding="utf-8"))["meta"]
        assert {"benchmark", "command", "date", "device", "foreign_load_pct", "load_average"} <= set(meta), path.name
        assert meta["command"].startswith(f"python bench/{meta['benchmark']}.py"), (path.name, meta["command"])
        assert f"[`{path.name}`](../bench/results/{path.name})" in text, f"{path.name} is not on docs/benchmarks.md"
    for target in re.findall(r"\]\((\.\./[^)#]+)\)", text):
        assert (DOC.parent / target).exists(), f"docs/benchmarks.md links to missing {target}"
    assert not re.search(r"/(home|work|tmp|Users)/", text), "a machine-specific path on the page"


def test_unknown_regions_and_results_without_a_region_are_refused(results):
    module = load_script()
    page = DOC.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="no_such_benchmark"):
        module.render(page + "\n<!-- results: no_such_benchmark -->\n<!-- end results -->\n", results)
    with pytest.raises(ValueError, match="gpu_model"):
        module.render(re.sub(r"<!-- results: gpu_model -->\n", "", page), results)


def test_gpu_results_are_rendered(results):
    """A gpu_check report (as gpu_check writes it) fills the GPU check region and gives At a glance its steps."""
    import gpu_check

    unet_row = {"model": "sd15", "size": 1024, "sites": 16, "attention_s": 0.25, "deltaconv_s": 0.1, "speedup": 2.5,
                "attention_peak_mib": 3000.0, "deltaconv_peak_mib": 2500.0, "mediators_s": 0.2,
                "mediators_speedup": 1.25, "mediators_peak_mib": 2800.0, "model_speedup": "1.32–1.66×",
                "removed_s": 0.05, "ceiling": 5.0}
    stages = {
        "kernels": {"status": "partial", "seconds": 90.0, "error": None, "notes": [],
                    "rows": [{"case": "fp16 512² grid", "skipped": "time budget spent"}]},
        "unet": {"status": "failed", "seconds": 120.0, "error": None, "notes": ["batch 2 (CFG), float16"],
                 "rows": [unet_row, {"model": "sd15", "size": 4096, "error": "out of memory"}]},
        "distill": {"status": "ok", "seconds": 60.0, "error": None, "notes": [],
                    "rows": [{"stage": "A", "steps_per_s": 5.0, "samples_per_s": 40.0, "peak_mib": 9000.0,
                              "peak_kind": "CUDA max allocated"}]},
    }
    meta = {"benchmark": "gpu_check", "command": "python bench/gpu_check.py", "date": "2026-12-01 12:00 UTC",
            "device": "NVIDIA Test GPU", "torch": "2.x", "threads": 8, "smoke": False, "seconds": 480,
            "foreign_load_pct": 2.0, "load_average": [0.5, 0.7]}
    report = {"meta": meta, "environment": {"device": "NVIDIA Test GPU", "torch": "2.x"}, "stages": stages,
              "targets": gpu_check.targets(stages)}
    (results / "gpu_nvidia-test-gpu.json").write_text(json.dumps(report))
    (results / "gpu_nvidia-test-gpu.md").write_text(gpu_check.markdown(report))
    text = load_script().render(DOC.read_text(encoding="utf-8"), results)
    glance, rest = text.split("## What is measured")
    assert "**GPU check on NVIDIA Test GPU** ([`gpu_nvidia-test-gpu.json`]" in glance
    assert "| sd15 | 1024² | 2.50× | 5.00× | 1.32–1.66× |" in glance
    gpu = rest.split("<!-- results: gpu_check -->")[1].split("<!-- end results -->")[0]
    assert "### GPU check on NVIDIA Test GPU ([`gpu_nvidia-test-gpu.json`]" in gpu
    assert "- command: `python bench/gpu_check.py`" in gpu
    assert "| UNet step sd15 1024²: ΔConv vs ComfyUI attention | ≥ 2.5× | 2.50× | met |" in gpu
    assert "| sd15 | 16 | 1024² | 0.250 | 0.100 | 2.50× | 1.32–1.66× | 0.200 | 1.25× | 0.050 | 5.00× | 3000 | 2500 " \
           "| 2800 |" in gpu
    assert "error: out of memory |" in gpu and "skipped: time budget spent |" in gpu
    assert "#### Targets" in gpu  # the report's own headings sit below the page's


def test_script_imports_neither_torch_nor_comfyui():
    code = (f"import runpy, sys\nsys.argv = [{str(SCRIPT)!r}, '--check']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'comfy', 'folder_paths') if m in sys.modules]\nassert not bad, bad\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_run_on_a_loaded_host_is_marked_and_never_a_headline(results):
    """A block run during which other processes used > 20 % of the cores (its meta block says how many)."""
    module = load_script()
    page = DOC.read_text(encoding="utf-8")
    source, loaded = results / "block_cpu-amd-epyc-2c.json", results / "block_loaded_cpu-amd-epyc-2c.json"

    def write_loaded(load: float):
        data = json.loads(source.read_text())
        data["meta"]["foreign_load_pct"] = load
        loaded.write_text(json.dumps(data))
        shutil.copy(source.with_suffix(".md"), loaded.with_suffix(".md"))
        glance, rest = module.render(page, results).split("## What is measured", 1)
        return glance, rest.split(f"[`{loaded.name}`]", 1)[1].split("\n### ", 1)[0]

    glance, section = write_loaded(88.8)
    assert module.MAX_FOREIGN_LOAD < 88.8 and module.MAX_FOREIGN_LOAD > 3.0
    assert loaded.name not in glance and source.name in glance
    assert "**Loaded host**: other processes used 88.8% of the cores" in section
    assert "| down_blocks.0 | 320 | 7 | 512² |" in section  # kept for the record
    glance, section = write_loaded(3.0)
    assert loaded.name in glance and "Loaded host" not in section
