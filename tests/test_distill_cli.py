"""The headless CLI: one process vs torchrun with 2 gloo processes on the CPU (DistributedDataParallel)."""
import os
import re
import socket
import subprocess
import sys

import distill
import pytest
import torch
from safetensors.torch import save_file

from deltaconv_core.weights import load_weights, read_training_state
from devkit.tiny_models import has_wan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = str(tmp_path_factory.mktemp("cli") / "latents.safetensors")
    save_file({"latents": torch.randn(6, 4, 8, 8, generator=g), "cond": torch.randn(1, 16, 768, generator=g),
               "uncond": torch.zeros(1, 16, 768)}, path)
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(comfy_path, launcher, *args):
    env = {**os.environ, "COMFYUI_PATH": comfy_path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, os.path.join(REPO, "scripts", "distill.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _blocks(path):
    return {f"{n}.{k}": v for n, (_, sd) in load_weights(path).students.items() for k, v in sd.items()}


def _blocks_of_fresh_start(load_tiny, like):
    """The blocks both runs started from (same seed): fresh blocks for the tiny model."""
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights

    sites = find_attention_sites(load_tiny("tiny_sd15").model.diffusion_model)
    fresh = DeltaConvWeights.fresh(sites, 5)
    return {f"{n}.{k}": v for n, (_, sd) in fresh.students.items() for k, v in sd.items() if f"{n}.{k}" in like}


def test_rate_counts_only_the_steps_this_run_trained_over_its_own_time():
    """The printed rate's arithmetic, on exact clock values (the console prints rounded seconds)."""
    ticks = iter([100.0, 102.0, 103.0, 104.5])
    rate = distill.Rate(samples_per_step=8, clock=lambda: next(ticks))  # started at 100 s
    assert rate.at(4) == (1, 2.0, 4.0)  # resumed after step 3: step 4 is this run's first
    assert rate.at(5) == (2, 3.0, 16 / 3)
    assert rate.at(6) == (3, 4.5, 24 / 4.5)


def test_ddp_two_processes_equal_one_process_with_the_whole_batch(comfy_path, tiny_models, load_tiny, latents_file,
                                                                  tmp_path):
    common = ["--unet", tiny_models["tiny_sd15"], "--latents", latents_file, "--stage", "A", "--steps", "3",
              "--batch-size", "4", "--lr", "1e-3", "--warmup", "0", "--save-every", "0", "--dtype", "fp32",
              "--seed", "5", "--cpu"]
    single = cli(comfy_path, [sys.executable], *common, "--out", str(tmp_path / "single"))
    assert "step 3/3" in single and "samples/s" in single
    ddp = cli(comfy_path, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port())],
              *common, "--out", str(tmp_path / "ddp"))
    assert "step 3/3" in ddp
    a, b = _blocks(str(tmp_path / "single_A_0000003.safetensors")), _blocks(str(tmp_path / "ddp_A_0000003.safetensors"))
    start = _blocks_of_fresh_start(load_tiny, a)
    for k in a:
        # Adam turns float-summation-order noise in near-zero gradients into steps of up to ~lr/100 here; a wrong
        # split of the batch moves weights by ~lr per step (checked against the start below).
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=5e-5, msg=k)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3
    info = read_training_state(str(tmp_path / "ddp_A_0000003.safetensors"))[1]
    assert info["step"] == 3 and len(info["losses"]) == 3

    # Resumed: the rate counts only the steps this run trained.
    resumed = cli(comfy_path, [sys.executable], *common, "--steps", "5",
                  "--resume", str(tmp_path / "single_A_0000003.safetensors"), "--out", str(tmp_path / "resumed"))
    assert int(re.search(r"step 5/5 .* samples/s over (\d+) steps in [\d.]+ s", resumed).group(1)) == 2
    assert read_training_state(str(tmp_path / "resumed_A_0000005.safetensors"))[1]["step"] == 5
    assert sorted(os.listdir(tmp_path)) == ["ddp_A_0000003.safetensors", "resumed_A_0000005.safetensors",
                                            "single_A_0000003.safetensors"]


@pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
def test_wan_video_latents_stage_a_then_b(comfy_path, tiny_models, tmp_path):
    """--latents with video latents [N, C, T, H, W] and T5-wide cond: mediator students, stage A, then stage B
    from A's checkpoint with gradient checkpointing."""
    g = torch.Generator().manual_seed(0)
    latents = str(tmp_path / "video.safetensors")
    save_file({"latents": torch.randn(2, 16, 3, 8, 12, generator=g), "cond": torch.randn(1, 16, 4096, generator=g),
               "uncond": torch.zeros(1, 16, 4096)}, latents)
    common = ["--unet", tiny_models["tiny_wan"], "--latents", latents, "--steps", "2", "--batch-size", "2",
              "--lr", "1e-3", "--warmup", "0", "--save-every", "0", "--dtype", "fp32", "--student", "mediators",
              "--cpu"]
    assert "step 2/2" in cli(comfy_path, [sys.executable], *common, "--stage", "A", "--out", str(tmp_path / "wan"))
    stage_a = str(tmp_path / "wan_A_0000002.safetensors")
    cli(comfy_path, [sys.executable], *common, "--stage", "B", "--gradient-checkpointing", "--resume", stage_a,
        "--out", str(tmp_path / "wan"))
    for path, stage in ((stage_a, "A"), (str(tmp_path / "wan_B_0000002.safetensors"), "B")):
        weights, info = load_weights(path), read_training_state(path)[1]
        assert weights.family == "wan" and {cfg.student for cfg, _ in weights.students.values()} == {"mediators"}
        assert info["config"]["stage"] == stage and len(info["losses"]) == 2
