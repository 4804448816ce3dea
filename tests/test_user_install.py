"""The pack as users install it: this repository in ComfyUI/custom_nodes/ComfyUI-DeltaConv, ComfyUI started from its
own folder (`python main.py --cpu`, no extra paths), and the user-facing scripts run with the Python ComfyUI runs on.

That Python is $DELTACONV_USER_PYTHON (scripts/test.sh gives a venv like ComfyUI's own: torch and ComfyUI's
requirements, no pytest, no .pth), else this one. When this checkout already sits in a ComfyUI's custom_nodes (the
test command's install step), that ComfyUI is used; else a copy of the test ComfyUI with a copy of the pack.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from graphs import digest, txt2img

from devkit import user_install
from devkit.comfy_env import REPO, installed_in
from devkit.comfy_server import ComfyServer
from devkit.tiny_models import SITE_COUNTS

USER_PYTHON = os.environ.get("DELTACONV_USER_PYTHON", sys.executable)
TESTS = os.path.dirname(os.path.abspath(__file__))
KNOWN_LIMITATION = "cannot backpropagate through this ComfyUI"  # stage B on ComfyUI before mid-2024


@pytest.fixture(scope="module")
def installed(comfy_path, tmp_path_factory):
    """(ComfyUI folder, pack folder)."""
    if installed_in():
        return installed_in(), REPO
    pack = user_install.install(comfy_path, str(tmp_path_factory.mktemp("user")))
    return os.path.dirname(os.path.dirname(pack)), pack


@pytest.fixture(scope="module")
def user_server(installed, tiny_models, tmp_path_factory):
    comfy, pack = installed
    # The models where a user puts them, and the test-only nodes beside the pack (conditioning without a text encoder).
    for name, folder in (("tiny_sd15", "unet"), ("tiny_sd15_random", "deltaconv")):
        os.makedirs(os.path.join(comfy, "models", folder), exist_ok=True)
        shutil.copy(tiny_models[name], os.path.join(comfy, "models", folder))
    shutil.copytree(os.path.join(TESTS, "test_nodes"), os.path.join(comfy, "custom_nodes", "deltaconv_test_nodes"),
                    dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    server = ComfyServer(comfy, {"base": str(tmp_path_factory.mktemp("log"))}, pack_dir=pack, python=USER_PYTHON,
                         own_folders=True)
    server.start()
    yield server
    server.stop()


def user_env() -> dict:
    """A user's shell: no COMFYUI_PATH (ComfyUI is found two levels up), no PYTHONPATH, no test settings."""
    drop = ("COMFYUI_PATH", "PYTHONPATH", "TRITON_INTERPRET", "DELTACONV_TRITON")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_script(installed, tmp_path, *args, timeout=600):
    result = subprocess.run([USER_PYTHON, os.path.join(installed[1], *args[0].split("/")), *args[1:]],
                            cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=timeout)
    return result, result.stdout + result.stderr


def test_the_users_python_has_no_dev_tools_and_no_path_files():
    if "DELTACONV_USER_PYTHON" not in os.environ:
        pytest.skip("no separate user Python given (scripts/test.sh gives one): this run uses the test Python")
    probe = ("import glob, importlib.util, os, sysconfig\n"
             "print(importlib.util.find_spec('pytest') is not None)\n"
             "print([os.path.basename(p) for p in glob.glob(os.path.join(sysconfig.get_paths()['purelib'], '*.pth'))])")
    has_pytest, pth = subprocess.run([USER_PYTHON, "-c", probe], capture_output=True, text=True,
                                     check=True).stdout.split("\n")[:2]
    assert has_pytest == "False"
    assert set(eval(pth)) <= {"distutils-precedence.pth"}, pth  # setuptools' own, in every venv


def test_comfyui_imports_the_pack_from_its_custom_nodes(user_server, installed, pack):
    log = user_server.log_text()
    folder = os.path.basename(installed[1])
    assert folder == "ComfyUI-DeltaConv"
    imported = [line for line in log.splitlines() if line.strip().endswith(os.path.join("custom_nodes", folder))]
    assert imported and "IMPORT FAILED" not in imported[0], log[-3000:]
    # ComfyUI's own extras may fail here (no torchaudio, spandrel): only a traceback through the pack counts.
    ours = [t for t in log.split("Traceback")[1:] if installed[1] in t.split("\n\n")[0]]
    assert not ours, ours[0][:3000]
    listed = user_server.get("/object_info")
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(listed)
    assert all(listed[name]["python_module"].endswith(folder) for name in pack.NODE_CLASS_MAPPINGS
               if "python_module" in listed[name])  # the installed folder, not a link (older ComfyUI: no field)


def test_a_patched_workflow_runs_through_the_users_comfyui(user_server):
    required = user_server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]
    unet_inputs = {"weight_dtype": "default"} if "weight_dtype" in required else {}
    d = digest(user_server.run(txt2img("sd15", "tiny_sd15_random.safetensors", steps=2, unet_inputs=unet_inputs)))
    assert d["patched_sites"] == SITE_COUNTS["tiny_sd15"] and d["finite"]
    assert set(d["counts"]) == {"deltaconv"} and d["counts"]["deltaconv"] >= 2 * SITE_COUNTS["tiny_sd15"], d["counts"]


def test_gpu_check_smoke_with_the_users_python(installed, tmp_path):
    result, output = run_script(installed, tmp_path, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())
    errors = [r["error"] for s in report["stages"].values() for r in s["rows"] if "error" in r]
    errors += [s["error"] for s in report["stages"].values() if s["error"]]
    assert all(KNOWN_LIMITATION in e for e in errors), errors
    assert result.returncode == (1 if errors else 0), output[-3000:]
    assert report["environment"]["ComfyUI"] != "unknown" and not report["environment"]["ComfyUI"].startswith("not")


def test_distill_cli_with_the_users_python(installed, tiny_models, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"latents": torch.randn(2, 4, 8, 8), "cond": torch.randn(1, 16, 768)}, str(tmp_path / "l.safetensors"))
    result, output = run_script(installed, tmp_path, "scripts/distill.py", "--unet", tiny_models["tiny_sd15"],
                                "--latents", str(tmp_path / "l.safetensors"), "--steps", "1", "--batch-size", "2",
                                "--warmup", "0", "--dtype", "fp32", "--cpu", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, output[-3000:]
    assert glob.glob(str(tmp_path / "run_A_*.safetensors")), output[-3000:]


def test_main_job_with_the_users_python(installed, tmp_path):
    result, output = run_script(installed, tmp_path, "scripts/demo.py", "--size", "64", "--steps", "1",
                                "--output", str(tmp_path / "images"), "--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, output[-3000:]
    assert len(os.listdir(tmp_path / "images")) == 2 and "speed-up" in output


@pytest.mark.parametrize("script", ["bench/bench_block.py", "bench/bench_unet.py", "bench/bench_distill.py",
                                    "scripts/make_benchmarks_doc.py", "scripts/quality_proxy/run.py"])
def test_benchmarks_start_with_the_users_python(installed, tmp_path, script):
    result, output = run_script(installed, tmp_path, script, "--help", timeout=120)
    assert result.returncode == 0 and "usage:" in output, output[-3000:]
