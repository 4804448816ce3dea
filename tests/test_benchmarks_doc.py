"""docs/benchmarks.md is generated from bench/results by bench/make_benchmarks_doc.py: the committed page must be
what the script makes of the committed results, so no number in it can drift by hand. Standard library only: the
script needs neither torch nor ComfyUI."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "make_benchmarks_doc.py"
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"


def load_script():
    spec = importlib.util.spec_from_file_location("make_benchmarks_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_page_equals_what_the_results_generate():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, (result.stderr + "\nRegenerate it: python bench/make_benchmarks_doc.py "
                                    "(never edit docs/benchmarks.md by hand)")


def test_every_result_is_on_the_page_and_every_link_resolves():
    text = DOC.read_text(encoding="utf-8")
    for path in sorted(RESULTS.glob("*.json")) + sorted(RESULTS.glob("*.png")):
        assert path.name in text, f"{path.name} is in bench/results but not on docs/benchmarks.md"
    for target in re.findall(r"\]\((\.\./[^)#]+)\)", text):
        assert (DOC.parent / target).exists(), f"docs/benchmarks.md links to missing {target}"
    assert not re.search(r"/(home|work|tmp|Users)/", text), "a machine-specific path on the page"


def test_no_gpu_results_says_how_to_take_them():
    module = load_script()
    if any(not p.stem.startswith("gpu_model") for p in RESULTS.glob("gpu_*.json")):
        return  # the GPU case is covered by test_gpu_results_are_rendered
    text = module.render(RESULTS)
    assert "No GPU results yet" in text and "bench/gpu_check.py" in text


def test_gpu_results_are_rendered(tmp_path):
    """A gpu_check report (as gpu_check.write_report writes it) becomes a section with its targets and tables."""
    module = load_script()
    gpu_report = module.gpu_report_module()
    for path in RESULTS.iterdir():
        shutil.copy(path, tmp_path / path.name)
    unet_row = {"model": "sd15", "size": 1024, "sites": 16, "attention_s": 0.25, "deltaconv_s": 0.1, "speedup": 2.5,
                "attention_peak_mib": 3000.0, "deltaconv_peak_mib": 2500.0, "mediators_s": 0.2,
                "mediators_speedup": 1.25, "mediators_peak_mib": 2800.0, "model_speedup": "1.32–1.66×",
                "removed_s": 0.05, "ceiling": 5.0}
    stages = {
        "kernels": {"status": "stopped", "seconds": 90.0, "error": None, "notes": [],
                    "rows": [{"case": "fp16 512² grid", "skipped": "stage budget spent"}]},
        "unet": {"status": "ok", "seconds": 120.0, "error": None, "notes": ["batch 2 (CFG), float16"],
                 "rows": [unet_row, {"model": "sd15", "size": 4096, "error": "out of memory"}]},
        "distill": {"status": "ok", "seconds": 60.0, "error": None, "notes": [],
                    "rows": [{"stage": "A", "steps_per_s": 5.0, "samples_per_s": 40.0, "peak_mib": 9000.0,
                              "peak_kind": "CUDA max allocated"}]},
    }
    report = {"meta": {"date": "2026-12-01 12:00 UTC", "command": "python bench/gpu_check.py",
                       "total time": "480 s"},
              "environment": {"device": "NVIDIA Test GPU", "torch": "2.x"}, "stages": stages,
              "targets": gpu_report.targets(stages)}
    (tmp_path / "gpu_nvidia-test-gpu.json").write_text(json.dumps(report))
    text = module.render(tmp_path)
    assert "No GPU results yet" not in text and "## GPU check" in text
    assert "### NVIDIA Test GPU" in text and "`python bench/gpu_check.py`" in text
    assert "UNet step sd15 1024²: ΔConv vs ComfyUI attention | ≥ 2.5× | 2.50× | met" in text
    row = "| sd15 | 1024² | 16 | 0.25 | 0.1 | 2.5× | 1.32–1.66× | 0.05 | 5× | 0.2 | 1.25× | 3000 | 2500 | 2800 |"
    assert row in text
    assert "error: out of memory" in text and "skipped: stage budget spent" in text
    assert "`nvidia-test-gpu`" in text.split("## At a glance")[0]


def test_template_sections_are_all_known(tmp_path):
    module = load_script()
    template = tmp_path / "template.md"
    template.write_text("# x\n\n{{block}}\n\n{{no_such_section}}\n")
    try:
        module.render(RESULTS, template)
    except KeyError as e:
        assert "no_such_section" in str(e)
    else:
        raise AssertionError("an unknown {{section}} in the template was not refused")


def test_script_imports_neither_torch_nor_comfyui():
    code = (f"import runpy, sys\nsys.argv = [{str(SCRIPT)!r}, '--check']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'comfy', 'folder_paths') if m in sys.modules]\nassert not bad, bad\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_run_on_a_loaded_host_is_marked_and_never_a_headline(tmp_path):
    """A block run during which other processes used > 20 % of the cores (its .md header says how many)."""
    module = load_script()
    for path in RESULTS.iterdir():
        shutil.copy(path, tmp_path / path.name)
    source = tmp_path / "block_cpu-amd-epyc-2c.md"
    loaded = tmp_path / "block_loaded_cpu-amd-epyc-2c.md"
    shutil.copy(source.with_suffix(".json"), loaded.with_suffix(".json"))
    header = re.sub(r"\(([\d.]+)% of all cores", "(88.8% of all cores", source.read_text())
    loaded.write_text(header)
    assert module.foreign_load(loaded) == 88.8 > module.MAX_FOREIGN_LOAD
    glance, rest = module.render(tmp_path).split("## What is measured", 1)
    assert loaded.with_suffix(".json").name not in glance and source.with_suffix(".json").name in glance
    assert "**loaded host**" in rest.split(loaded.with_suffix(".json").name, 1)[1].split("###", 1)[0]
    loaded.write_text(header.replace("(88.8% of all cores", "(3.0% of all cores"))
    assert loaded.with_suffix(".json").name in module.render(tmp_path).split("## What is measured", 1)[0]
