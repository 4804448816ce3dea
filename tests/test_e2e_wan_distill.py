"""Distilling mediator students for Wan 2.x through a real ComfyUI server, data-free: the tiny Wan model's own
video samples (EmptyHunyuanLatentVideo → KSampler) → ΔConv Distill stage A → ΔConv Save → ΔConv Load → ΔConv Patch
→ KSampler; stage B from those students; ΔConv Distill (simple)'s check preset; Cancel saving a checkpoint that
resumes."""
import copy
import glob
import os
import re
import shutil
import time

import pytest
from graphs import MODELS, VIDEO_LATENTS, digest, txt2img

from deltaconv_core.weights import load_weights, read_training_state
from devkit.tiny_models import SITE_COUNTS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
SITES = SITE_COUNTS["tiny_wan"]
STEPS = 3  # sampling steps with the distilled students


def data_free_graph(unet_inputs, trainer: dict):
    """Two of the teacher's own video latents (3 latent frames of 8 × 12) and T5-wide conditioning, into
    `trainer` (ΔConv Distill or its simple node, given by its inputs besides the data), then ΔConv Save."""
    cond = {"tokens": 16, "dim": MODELS["wan"][1], "pooled_dim": 0}
    latent = copy.deepcopy(VIDEO_LATENTS["wan"])
    latent["inputs"]["batch_size"] = 2
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": MODELS["wan"][0], **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": latent,
        "teacher": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "distill": {**trainer, "inputs": {"model": ["unet", 0], "latents": ["teacher", 0], "positive": ["pos", 0],
                                          "negative": ["neg", 0], **trainer["inputs"]}},
    }


def distill_node(prefix, stage, steps, save_every=0, start=None):
    node = {"class_type": "DeltaConvDistill", "inputs": {
        "stage": stage, "steps": steps, "learning_rate": 1e-3, "batch_size": 2, "seed": 0, "save_every": save_every,
        "filename_prefix": prefix, "warmup_steps": 0, "training_dtype": "fp32", "allow_cpu": True,
        "student": "mediators"}}
    if start is not None:
        node["inputs"]["deltaconv"] = ["load", 0]
    return node


def with_save(graph, name, start=None):
    graph["save"] = {"class_type": "DeltaConvSave", "inputs": {"deltaconv": ["distill", 0], "filename": name,
                                                               "overwrite": True}}
    if start is not None:
        graph["load"] = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": start}}
    return graph


def sample_with(server, unet_inputs, weights):
    """KSampler on a video latent with the saved students; every step runs them at every site."""
    d = digest(server.run(txt2img("wan", weights, seed=9, steps=STEPS, unet_inputs=unet_inputs)))
    assert d["shape"] == [1, 16, 3, 8, 12] and d["finite"] and d["patched_sites"] == SITES
    assert sum(n for k, n in d["counts"].items() if not k.startswith("attention:")) == SITES * STEPS, d["counts"]
    assert d["sites"] == {f"blocks.{i}": STEPS for i in range(SITES)}


@pytest.fixture(scope="module")
def stage_a(server, unet_inputs):
    """Stage A, 4 steps with a checkpoint every 2, saved as wan_distilled_a."""
    graph = with_save(data_free_graph(unet_inputs, distill_node("wan_a", "A", 4, save_every=2)), "wan_distilled_a")
    entry = server.run(graph)
    return entry["outputs"]["save"]["text"][0]


def test_stage_a_save_load_patch_sample(server, unet_inputs, stage_a):
    assert stage_a == os.path.join(server.base, "models", "deltaconv", "wan_distilled_a.safetensors")
    weights = load_weights(stage_a)
    assert weights.family == "wan" and {cfg.student for cfg, _ in weights.students.values()} == {"mediators"}
    checkpoints = sorted(os.path.basename(p) for p in glob.glob(os.path.join(server.base, "output", "deltaconv",
                                                                              "wan_a_*.safetensors")))
    assert checkpoints == ["wan_a_00001_A_0000002.safetensors", "wan_a_00001_A_0000004.safetensors"]
    assert read_training_state(os.path.join(server.base, "output", "deltaconv", checkpoints[1]))[1]["step"] == 4
    sample_with(server, unet_inputs, "wan_distilled_a.safetensors")


def test_stage_b_from_stage_a(server, unet_inputs, stage_a):
    graph = with_save(data_free_graph(unet_inputs, distill_node("wan_b", "B", 2, start="wan_distilled_a.safetensors")),
                      "wan_distilled_b", start="wan_distilled_a.safetensors")
    graph["distill"]["inputs"]["gradient_checkpointing"] = True
    server.run(graph)
    [checkpoint] = glob.glob(os.path.join(server.base, "output", "deltaconv", "wan_b_*_B_0000002.safetensors"))
    info = read_training_state(checkpoint)[1]
    assert info["step"] == 2 and len(info["losses"]) == 2
    sample_with(server, unet_inputs, "wan_distilled_b.safetensors")


def test_simple_check_preset(server, unet_inputs):
    """The simple node has no student widget: on Wan, as on images, it trains ΔConv blocks (3-D ones here), which
    then sample."""
    graph = with_save(data_free_graph(unet_inputs, {"class_type": "DeltaConvDistillSimple", "inputs": {
        "preset": "check", "filename_prefix": "wan_simple"}}), "wan_simple")
    saved = server.run(graph)["outputs"]["save"]["text"][0]
    weights = load_weights(saved)
    assert weights.family == "wan" and len(weights.students) == SITES
    assert {cfg.student for cfg, _ in weights.students.values()} == {"deltaconv"}
    assert all(cfg.time_kernel > 0 for cfg, _ in weights.students.values())
    sample_with(server, unet_inputs, "wan_simple.safetensors")


def _wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cancel_saves_a_checkpoint_that_resumes(server, unet_inputs):
    output = os.path.join(server.base, "output", "deltaconv")
    prompt_id = server.queue(with_save(data_free_graph(unet_inputs, distill_node("wan_cancel", "A", 100_000,
                                                                                 save_every=2)), "wan_cancelled"))
    _wait_for(lambda: glob.glob(os.path.join(output, "wan_cancel_*_A_*.safetensors")), 240, "the first checkpoint")
    server.post("/interrupt", {})
    entry = server.ended(prompt_id, timeout=120)
    kinds = [message[0] for message in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, kinds
    assert "save" not in entry.get("outputs", {})

    found = re.search(r"ΔConv Distill: cancelled at step (\d+); checkpoint saved to (\S*wan_cancel\S*) \(connect",
                      server.log_text())
    assert found, server.log_text()[-3000:]
    step, path = int(found[1]), found[2]
    assert step >= 2 and read_training_state(path)[1]["step"] == step

    shutil.copy(path, os.path.join(server.base, "models", "deltaconv", "wan_cancelled_copy.safetensors"))
    resumed = with_save(data_free_graph(unet_inputs, distill_node("wan_resumed", "A", step + 1,
                                                                  start="wan_cancelled_copy.safetensors")),
                        "wan_resumed", start="wan_cancelled_copy.safetensors")
    assert "save" in server.run(resumed)["outputs"]
    assert re.search(rf"resuming .*wan_cancelled_copy\.safetensors'? at step {step}\b", server.log_text())
    [final] = glob.glob(os.path.join(output, f"wan_resumed_*_A_{step + 1:07d}.safetensors"))
    assert len(read_training_state(final)[1]["losses"]) == step + 1
