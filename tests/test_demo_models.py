"""The main job's embedded default models: a run killed while generating them leaves nothing the next run trusts."""
import glob
import os
import signal
import subprocess
import sys
import time

from safetensors import safe_open

from devkit.comfy_env import child_env

GENERATE = """
import sys
from devkit.comfy_env import load_pack, setup_comfy
setup_comfy(sys.argv[1], cpu=True)
load_pack()
import demo
print(demo.embedded_models(sys.argv[2]))
"""


def generate(comfy_path, models_dir):
    return subprocess.Popen([sys.executable, "-c", GENERATE, comfy_path, models_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env())


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_killed_generation_is_repaired_by_the_next_run(comfy_path, tmp_path):
    models_dir = str(tmp_path / "models")
    partial = lambda: glob.glob(str(tmp_path / "models.partial-*" / "unet" / "*.safetensors"))
    proc = generate(comfy_path, models_dir)
    assert wait_for(partial, proc), f"generation never got under way:\n{proc.communicate()[0]}"
    proc.send_signal(signal.SIGKILL)  # midway: the UNet is written, the CLIP and TAESD are not
    proc.wait()
    assert not os.path.exists(models_dir) and partial()

    proc = generate(comfy_path, models_dir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert not glob.glob(str(tmp_path / "models.partial-*"))
    files = sorted(os.path.relpath(p, models_dir) for p in glob.glob(os.path.join(models_dir, "*", "*")))
    assert files == ["clip/deltaconv_demo_clip_l.safetensors", "deltaconv/deltaconv_demo_sd15_untrained.safetensors",
                     "unet/deltaconv_demo_sd15.safetensors", "vae_approx/taesd_decoder.safetensors",
                     "vae_approx/taesd_encoder.safetensors"]
    for name in files:
        with safe_open(os.path.join(models_dir, name), "pt") as f:
            assert len(list(f.keys())) > 0


def test_a_folder_without_the_completion_mark_is_rebuilt(comfy_path, tmp_path):
    """What an older version left after a crash: some files in place, others missing."""
    models_dir = tmp_path / "models"
    (models_dir / "unet").mkdir(parents=True)
    (models_dir / "unet" / "deltaconv_demo_sd15.safetensors").write_bytes(b"truncated")
    proc = generate(comfy_path, str(models_dir))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert (models_dir / "clip" / "deltaconv_demo_clip_l.safetensors").exists()
    with safe_open(str(models_dir / "unet" / "deltaconv_demo_sd15.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
