"""Weight files survive crashes: a save killed mid-way leaves the old file, and the next save cleans up after it."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import deltaconv_core.weights as weights_mod
from deltaconv_core.block import BlockConfig
from deltaconv_core.students import build_student
from deltaconv_core.weights import DeltaConvWeights, load_weights, remove_stale_temp_files, save_weights
from devkit.comfy_env import child_env

NAME = "down_blocks.0.attentions.0.transformer_blocks.0"

# A child process saves over `path`, but stops for good once the temp file is written: SIGKILL lands there.
CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from devkit.comfy_env import import_core
    import_core()
    import deltaconv_core.weights as w
    from deltaconv_core.block import BlockConfig
    from deltaconv_core.students import build_student

    real = w.save_file
    def save_then_hang(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        print("written", flush=True)
        time.sleep(600)
    w.save_file = save_then_hang
    cfg = BlockConfig(8, 3, (1.0, 0.5), "scaled")
    sd = {k: torch.full_like(v, 2.0) for k, v in build_student(cfg).state_dict().items()}
    w.save_weights(w.DeltaConvWeights("sd1", {sys.argv[2]: (cfg, sd)}), sys.argv[1], overwrite=True)
""")


def weights_filled_with(value: float) -> DeltaConvWeights:
    cfg = BlockConfig(8, 3, (1.0, 0.5), "scaled")
    return DeltaConvWeights("sd1", {NAME: (cfg, {k: torch.full_like(v, value)
                                                 for k, v in build_student(cfg).state_dict().items()})})


def temp_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith(".deltaconv-") and f.endswith(".tmp"))


def test_killed_save_keeps_the_old_file_and_the_next_save_removes_its_temp(tmp_path):
    path = save_weights(weights_filled_with(1.0), str(tmp_path / "w.safetensors"))
    before = (tmp_path / "w.safetensors").read_bytes()
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, NAME], stdout=subprocess.PIPE, text=True,
                             env=child_env(OMP_NUM_THREADS="1"))
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert (tmp_path / "w.safetensors").read_bytes() == before  # the old file, whole
    left = temp_files(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".deltaconv-{child.pid}-")

    save_weights(weights_filled_with(3.0), str(tmp_path / "other.safetensors"))
    assert temp_files(tmp_path) == left  # a fresh temp file may be another machine's save in flight: kept
    old = time.time() - weights_mod.TEMP_GRACE_SECONDS - 60
    os.utime(tmp_path / left[0], (old, old))
    save_weights(weights_filled_with(3.0), path, overwrite=True)
    assert temp_files(tmp_path) == []
    assert torch.equal(load_weights(path).students[NAME][1]["conv_pool.weight"], torch.full((8, 8), 3.0))


def test_stale_rules_spare_live_writers_and_foreign_files(tmp_path):
    now = time.time()
    files = {".deltaconv-abc_12.tmp": now - weights_mod.TEMP_GRACE_SECONDS - 1,  # older naming: no pid
             f".deltaconv-{os.getpid()}-x1.tmp": now - weights_mod.TEMP_GRACE_SECONDS - 1,  # a live writer
             f".deltaconv-{os.getpid()}-x2.tmp": now - weights_mod.TEMP_MAX_AGE_SECONDS - 1,  # pid reused
             ".other-1-x.tmp": now - weights_mod.TEMP_MAX_AGE_SECONDS - 1}  # not ours
    for name, mtime in files.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    removed = remove_stale_temp_files(str(tmp_path), now)
    assert sorted(map(os.path.basename, removed)) == [f".deltaconv-{os.getpid()}-x2.tmp", ".deltaconv-abc_12.tmp"]
    assert sorted(os.listdir(tmp_path)) == [f".deltaconv-{os.getpid()}-x1.tmp", ".other-1-x.tmp"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the synced files")
def test_save_syncs_the_file_before_the_rename_and_then_the_folder(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_weights(weights_filled_with(1.0), str(tmp_path / "w.safetensors"))
    tmp = events[1][1]
    assert os.path.basename(tmp).startswith(".deltaconv-")
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
