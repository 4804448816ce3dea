"""ΔConv Distill (simple) through a real ComfyUI server: the check preset (stage A then B, 2 steps each) gives
exactly what ΔConv Distill gives with the settings the simple node logged."""
import glob
import json
import os
import re

import pytest
import torch

from deltaconv_core.weights import load_weights, read_training_state

LOGGED = re.compile(r"ΔConv Distill \(simple\): preset '[^']*', phase (\d+)/(\d+): ΔConv Distill with (\{.*\}), "
                    r"starting from")


def inputs_graph(unet_inputs):
    cond = {"tokens": 16, "dim": 768, "pooled_dim": 0}
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
    }


def data():
    return {"model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "negative": ["neg", 0]}


def tensors(path):
    return {f"{n}.{k}": v for n, (_, sd) in load_weights(path).students.items() for k, v in sd.items()}


def test_check_preset_equals_distill_with_the_logged_settings(server, unet_inputs, pack):
    if pack.nodes.compat.LEGACY_ATTN1_CALL:
        pytest.skip("the check preset runs stage B, which needs ComfyUI from mid-2024 on")
    folder = os.path.join(server.base, "output", "deltaconv")
    made = []
    try:
        simple = {**inputs_graph(unet_inputs),
                  "simple": {"class_type": "DeltaConvDistillSimple", "inputs": {
                      **data(), "preset": "check", "filename_prefix": "simple_check"}},
                  "save": {"class_type": "DeltaConvSave", "inputs": {
                      "deltaconv": ["simple", 0], "filename": "simple_check", "overwrite": False}}}
        made.append(server.run(simple)["outputs"]["save"]["text"][0])
        logged = [m for m in LOGGED.finditer(server.log_text()) if '"simple_check"' in m[3]]
        assert [(m[1], m[2]) for m in logged] == [("1", "2"), ("2", "2")]
        phases = [json.loads(m[3]) for m in logged]
        assert [(p["stage"], p["steps"], p["batch_size"]) for p in phases] == [("A", 2, 2), ("B", 2, 2)]

        # the advanced node, given those settings (phase 2 starting from phase 1's blocks)
        advanced = {**inputs_graph(unet_inputs),
                    "a": {"class_type": "DeltaConvDistill", "inputs": {
                        **data(), **phases[0], "filename_prefix": "advanced_check"}},
                    "b": {"class_type": "DeltaConvDistill", "inputs": {
                        **data(), **phases[1], "filename_prefix": "advanced_check", "deltaconv": ["a", 0]}},
                    "save": {"class_type": "DeltaConvSave", "inputs": {
                        "deltaconv": ["b", 0], "filename": "advanced_check", "overwrite": False}}}
        made.append(server.run(advanced)["outputs"]["save"]["text"][0])

        for stage in ("A", "B"):  # one final checkpoint per phase and node (named <prefix>[_<run>]_<stage>_<step>)
            ours, theirs = (glob.glob(os.path.join(folder, f"{who}_check_*{stage}_0000002.safetensors"))
                            for who in ("simple", "advanced"))
            assert len(ours) == len(theirs) == 1, (ours, theirs)
            assert read_training_state(ours[0])[1]["losses"] == read_training_state(theirs[0])[1]["losses"], stage
            a, b = tensors(ours[0]), tensors(theirs[0])
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        saved_simple, saved_advanced = made
        assert all(torch.equal(x, y) for x, y in zip(tensors(saved_simple).values(),
                                                     tensors(saved_advanced).values(), strict=True))
    finally:  # leave the shared server's folders as other tests expect them
        for path in set(made) | set(glob.glob(os.path.join(folder, "*_check_*.safetensors"))):
            os.remove(path)
