"""Wan 2.x through a real ComfyUI server: fresh mediator students from the tiny model's own attention and fresh 3-D
ΔConv blocks, saved, then ΔConv Load → ΔConv Patch → KSampler on a video latent; the unpatched model untouched, the
fallback exact, zero-output ΔConv blocks exactly self-attention removed."""
import os
from collections import Counter

import pytest
import torch
from graphs import digest, txt2img, with_model_node

from deltaconv_core.families import find_attention_sites
from deltaconv_core.mediators import DEFAULT_SCHEDULE
from deltaconv_core.students import DELTACONV
from deltaconv_core.weights import DeltaConvWeights, save_weights
from devkit.tiny_models import SITE_COUNTS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
STEPS = 3
SITES = SITE_COUNTS["tiny_wan"]
FRESH = "tiny_wan_fresh_mediators.safetensors"
FRESH_DELTACONV = "tiny_wan_fresh_deltaconv.safetensors"


@pytest.fixture(scope="module")
def expected_counts(server, load_tiny):
    """Fresh mediator students (zero DWCs) saved where ΔConv Load finds them; the counts their default schedule
    gives KSampler's steps on the tiny Wan model."""
    import comfy.samplers

    model = load_tiny("tiny_wan")
    diffusion_model = model.model.diffusion_model
    weights = DeltaConvWeights.fresh_mediators(find_attention_sites(diffusion_model), diffusion_model)
    save_weights(weights, os.path.join(server.base, "models", "deltaconv", FRESH), overwrite=True)
    sampling = model.get_model_object("model_sampling")
    counts = DEFAULT_SCHEDULE.resolve(sampling.percent_to_sigma)
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)[:-1]
    return {k: v * SITES for k, v in Counter(f"mediators:{counts(float(s))}" for s in sigmas).items()}


def test_mediators_patch_and_sample_a_video(server, unet_inputs, expected_counts):
    g = txt2img("wan", FRESH, seed=5, steps=STEPS, unet_inputs=unet_inputs,
                extra_models=[("_plain", None), ("_outside", FRESH)])
    g["patch_outside"]["inputs"].update(start_percent=1.0, end_percent=1.0)  # no step inside: every call falls back
    g["report"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["patch", 1]}}
    entry = server.run(g)
    d, plain, outside = digest(entry), digest(entry, "_plain"), digest(entry, "_outside")
    assert d["shape"] == [1, 16, 3, 8, 12] and d["finite"] and d["mean_abs"] > 0
    assert d["patched_sites"] == SITES and d["counts"] == expected_counts
    assert len(expected_counts) > 1  # the schedule switches counts between the tiny run's steps
    assert d["sites"] == {f"blocks.{i}": STEPS for i in range(SITES)}
    assert d["sha256"] != plain["sha256"]
    assert outside["counts"] == {"attention:sigma": SITES * STEPS}
    assert outside["sha256"] == plain["sha256"]  # the wrapper's fallback is exactly the original attention
    report = entry["outputs"]["report"]["text"][0]
    assert "Wan 2.x T2V (2 self-attention sites)" in report, report
    assert f"students: mediator attention at {SITES} sites" in report, report


def test_unpatched_model_bit_identical_before_and_after(server, unet_inputs, expected_counts):
    before = server.run(txt2img("wan", None, seed=21, unet_inputs=unet_inputs))
    patched = server.run(txt2img("wan", FRESH, seed=21, unet_inputs=unet_inputs))
    after = server.run(txt2img("wan", None, seed=21, unet_inputs=unet_inputs))
    cached = [m[1].get("nodes", []) for m in after["status"]["messages"] if m[0] == "execution_cached"]
    assert "sampler" not in [n for nodes in cached for n in nodes], "the sampler must really run again"
    assert digest(patched)["sha256"] != digest(before)["sha256"]
    assert digest(after)["sha256"] == digest(before)["sha256"]


def test_random_dwc_file_loads_and_runs(server, unet_inputs):
    """The devkit's tiny_wan_mediators (random per-frame and time DWCs) through Load and Patch."""
    d = digest(server.run(txt2img("wan", "tiny_wan_mediators.safetensors", seed=7, steps=2, unet_inputs=unet_inputs)))
    assert d["finite"] and d["patched_sites"] == SITES
    assert sum(v for k, v in d["counts"].items() if k.startswith("mediators:")) == SITES * 2


@pytest.fixture(scope="module")
def fresh_deltaconv(server, load_tiny):
    """Fresh ΔConv blocks for the tiny model (3 taps in time), their conv_time made random so that time matters,
    saved where ΔConv Load finds them."""
    diffusion_model = load_tiny("tiny_wan").model.diffusion_model
    weights = DeltaConvWeights.fresh_students(DELTACONV, find_attention_sites(diffusion_model), diffusion_model)
    g = torch.Generator().manual_seed(3)
    for config, state in weights.students.values():
        assert config.time_kernel == 3
        state["conv_time.weight"] = torch.randn(state["conv_time.weight"].shape, generator=g) * 0.1
    return save_weights(weights, os.path.join(server.base, "models", "deltaconv", FRESH_DELTACONV), overwrite=True)


def test_deltaconv_patch_and_sample_a_video(server, unet_inputs, fresh_deltaconv):
    g = txt2img("wan", FRESH_DELTACONV, seed=5, steps=STEPS, unet_inputs=unet_inputs, extra_models=[("_plain", None)])
    g["report"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["patch", 1]}}
    entry = server.run(g)
    d, plain = digest(entry), digest(entry, "_plain")
    assert d["shape"] == [1, 16, 3, 8, 12] and d["finite"] and d["mean_abs"] > 0
    assert d["patched_sites"] == SITES and d["counts"] == {"deltaconv": SITES * STEPS}
    assert d["sites"] == {f"blocks.{i}": STEPS for i in range(SITES)}
    assert d["sha256"] != plain["sha256"]
    report = entry["outputs"]["report"]["text"][0]
    assert "3 taps in time" in report, report


def test_zero_deltaconv_blocks_equal_removed_self_attention(server, unet_inputs):
    """The devkit's tiny_wan_zero (conv_out and conv_pool zero): each site outputs exactly zero, as without
    self-attention; its random sibling runs too."""
    zero = server.run(txt2img("wan", "tiny_wan_zero.safetensors", seed=31, unet_inputs=unet_inputs,
                              extra_models=[("_random", "tiny_wan_random.safetensors")]))
    removed = server.run(with_model_node(txt2img("wan", None, seed=31, unet_inputs=unet_inputs),
                                         "DeltaConvTestZeroWanSelfAttn", {}))
    plain = server.run(txt2img("wan", None, seed=31, unet_inputs=unet_inputs))
    assert digest(zero)["counts"] == digest(zero, "_random")["counts"] == {"deltaconv": SITES * STEPS}
    assert digest(zero)["sha256"] == digest(removed)["sha256"] != digest(plain)["sha256"]
    assert digest(zero, "_random")["finite"] and digest(zero, "_random")["sha256"] != digest(zero)["sha256"]
