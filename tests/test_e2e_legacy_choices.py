"""Prompts saved with the choice texts of older releases, queued through POST /prompt on the running server: they
pass validation (ComfyUI would refuse a choice not in the list) and run exactly as the matching key."""
import os

import torch
from graphs import digest, txt2img

from deltaconv_core.mediators import MediatorConfig
from deltaconv_core.weights import load_weights

COND = {"tokens": 16, "dim": 768, "pooled_dim": 0}


def inputs_graph(unet_inputs):
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **COND}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def failure(server, graph) -> str:
    """The execution error of a prompt that passed validation (POST /prompt raises when it does not)."""
    entry = server.ended(server.queue(graph))
    assert entry["status"]["status_str"] == "error", entry["status"]
    return " ".join(m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_old_levels_patch_as_the_key(server, unet_inputs):
    old, key = (digest(server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=71, steps=1, levels=levels,
                                          unet_inputs=unet_inputs)))
                for levels in ("finest two", "finest_two"))
    assert old == key and old["patched_sites"] == 7  # the tiny UNet has attention at two levels only


def test_old_stage_and_student_train_as_the_keys(server, unet_inputs):
    def distill(prefix, stage, student):
        return {"class_type": "DeltaConvDistill", "inputs": {
            "model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "stage": stage, "steps": 1,
            "learning_rate": 1e-3, "batch_size": 1, "seed": 0, "save_every": 0, "filename_prefix": prefix,
            "warmup_steps": 0, "training_dtype": "fp32", "allow_cpu": True, "student": student}}

    graph = {**inputs_graph(unet_inputs),
             "old": distill("legacy_old", "A: block-local", "mediator attention"),
             "key": distill("legacy_key", "A", "mediators"),
             "show_old": {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["old", 2]}},
             "show_key": {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["key", 2]}}}
    outputs = server.run(graph)["outputs"]
    old, key = (outputs[f"show_{n}"]["text"][0] for n in ("old", "key"))
    try:
        assert os.path.basename(old).startswith("legacy_old_") and "_A_0000001" in old
        old_weights, key_weights = load_weights(old), load_weights(key)
        assert all(isinstance(cfg, MediatorConfig) for cfg, _ in old_weights.students.values())
        assert old_weights.students.keys() == key_weights.students.keys()
        for name, (_, tensors) in old_weights.students.items():
            assert all(torch.equal(v, key_weights.students[name][1][k]) for k, v in tensors.items()), name
    finally:  # leave the shared server's output folder as other tests expect it
        for path in (old, key):
            os.remove(path)


def test_old_presets_run_as_their_key(server, unet_inputs):
    """Cheap proofs of the mapping: each preset's own refusal, worded with its key (the test server has no GPU)."""
    def simple(preset):
        return {**inputs_graph(unet_inputs), "simple": {"class_type": "DeltaConvDistillSimple", "inputs": {
            "model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "preset": preset,
            "filename_prefix": "legacy_simple"}},
            "show": {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["simple", 2]}}}

    fine_tune = failure(server, simple("fine-tune connected blocks: stage B, 2000 steps at a low learning rate"))
    assert "the fine_tune preset trains the blocks connected as deltaconv" in fine_tune
    assert "the quick preset would take days" in failure(server, simple("quick: stage A, 2000 steps"))
