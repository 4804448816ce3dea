"""Wan 2.2 A14B's two experts through a real ComfyUI server: a high-noise and a low-noise model of one architecture
but different weights (here two tiny Wan models from different seeds), each patched with its own students, sampled
as Wan 2.2 workflows do (KSamplerAdvanced: the high-noise expert takes steps 0-k and returns the leftover noise, the
low-noise one finishes from step k). Each file carries its expert's per-site fingerprints: swapped, ΔConv Patch says
so in its report."""
import os

import pytest
from graphs import MODELS, VIDEO_LATENTS, digest

from deltaconv_core.families import find_attention_sites
from deltaconv_core.mediators import DEFAULT_SCHEDULE
from deltaconv_core.weights import DeltaConvWeights, save_weights
from devkit.tiny_models import SITE_COUNTS, TINY_MODELS, _save, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
SITES = SITE_COUNTS["tiny_wan"]
STEPS, SWITCH = 4, 2  # the low-noise expert takes over at step 2 of 4
EXPERTS = {"high": "tiny_wan.safetensors", "low": "tiny_wan_expert_low.safetensors"}
FILES = {expert: f"wan_expert_{expert}.safetensors" for expert in EXPERTS}
MISMATCH = "distilled from a different checkpoint than this model"


@pytest.fixture(scope="module")
def expected_counts(server, pack):
    """The low-noise expert (tiny_wan's architecture, another seed) written beside tiny_wan, and each expert's
    mediator students, initialised from its own attention and fingerprinted as ΔConv Distill does, saved where ΔConv
    Load finds them. Returns the mediator counts the default schedule gives each expert's steps."""
    import comfy.samplers

    _save(TINY_MODELS["tiny_wan"].build(19), os.path.join(server.base, "models", "unet", EXPERTS["low"]))
    expected = {}
    for expert, unet in EXPERTS.items():
        model = pack.nodes.compat.load_diffusion_model(os.path.join(server.base, "models", "unet", unet))
        sites = find_attention_sites(model.model.diffusion_model)
        weights = DeltaConvWeights.fresh_mediators(sites, model.model.diffusion_model)
        weights.site_fingerprints = pack.nodes.distill_run.model_fingerprints(model, sites)
        save_weights(weights, os.path.join(server.base, "models", "deltaconv", FILES[expert]), overwrite=True)
        sampling = model.get_model_object("model_sampling")
        counts = DEFAULT_SCHEDULE.resolve(sampling.percent_to_sigma)
        sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)[:-1]
        steps = sigmas[:SWITCH] if expert == "high" else sigmas[SWITCH:]
        expected[expert] = {}
        for sigma in steps:
            key = f"mediators:{counts(float(sigma))}"
            expected[expert][key] = expected[expert].get(key, 0) + SITES
    return expected


def two_expert_graph(unet_inputs, files=None, seed=3):
    """UNETLoader per expert → [ΔConv Load → ΔConv Patch: `files`, expert → weights] → KSamplerAdvanced (high: steps
    0-SWITCH, leftover noise returned; low: SWITCH-end, no new noise), a digest after each."""
    cond = {"tokens": 16, "dim": MODELS["wan"][1], "pooled_dim": 0}
    g = {"pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 11, **cond}},
         "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 12, **cond}},
         "latent": VIDEO_LATENTS["wan"]}
    latent = ["latent", 0]
    for expert, unet in EXPERTS.items():
        g[f"unet_{expert}"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, **unet_inputs}}
        model = [f"unet_{expert}", 0]
        if files:
            g[f"load_{expert}"] = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": files[expert]}}
            g[f"patch_{expert}"] = {"class_type": "DeltaConvPatch", "inputs": {
                "model": model, "deltaconv": [f"load_{expert}", 0], "start_percent": 0.0, "end_percent": 1.0,
                "levels": "all", "strict": True}}
            g[f"report_{expert}"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": [f"patch_{expert}", 1]}}
            model = [f"patch_{expert}", 0]
        high = expert == "high"
        g[f"sampler_{expert}"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": "enable" if high else "disable", "noise_seed": seed, "steps": STEPS,
            "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0],
            "negative": ["neg", 0], "latent_image": latent, "start_at_step": 0 if high else SWITCH,
            "end_at_step": SWITCH if high else 10000, "return_with_leftover_noise": "enable" if high else "disable"}}
        g[f"digest_{expert}"] = {"class_type": "DeltaConvTestDigest",
                                 "inputs": {"samples": [f"sampler_{expert}", 0], "model": model}}
        latent = [f"sampler_{expert}", 0]
    return g


def run(server, graph):
    outputs = server.run(graph)["outputs"]
    reports = {e: outputs[f"report_{e}"]["text"][0] for e in EXPERTS if f"report_{e}" in outputs}
    return {e: digest({"outputs": outputs}, f"_{e}") for e in EXPERTS}, reports


def test_each_expert_runs_its_own_students(server, unet_inputs, expected_counts):
    plain, _ = run(server, two_expert_graph(unet_inputs))
    patched, reports = run(server, two_expert_graph(unet_inputs, FILES))
    for expert in EXPERTS:
        d = patched[expert]
        assert d["shape"] == [1, 16, 3, 8, 12] and d["finite"] and d["mean_abs"] > 0
        assert d["patched_sites"] == SITES
        # Each expert's students ran on its own steps only: the high-noise ones at the large sigmas.
        assert d["counts"] == expected_counts[expert], (expert, d["counts"])
        assert d["sites"] == {f"blocks.{i}": SWITCH if expert == "high" else STEPS - SWITCH for i in range(SITES)}
        assert d["sha256"] != plain[expert]["sha256"]
        assert MISMATCH not in reports[expert], reports[expert]
        assert f"weights: {FILES[expert]}: Wan 2.x" in reports[expert]
    assert expected_counts["high"] != expected_counts["low"]  # the schedule tells the two halves apart


def test_swapped_files_are_named_in_both_reports(server, unet_inputs, expected_counts):
    right, _ = run(server, two_expert_graph(unet_inputs, FILES))
    swapped, reports = run(server, two_expert_graph(unet_inputs, {"high": FILES["low"], "low": FILES["high"]}))
    assert swapped["high"]["sha256"] != right["high"]["sha256"]  # other students on the same model
    assert swapped["low"]["sha256"] != right["low"]["sha256"]
    for expert in EXPERTS:
        report = reports[expert]
        assert f"{MISMATCH} ({SITES} of {SITES} sites differ in their attention weights, first blocks.0)" in report
        assert ("Wan 2.2 A14B: the high-noise and low-noise experts are two checkpoints, each with its own ΔConv "
                "file: check that each ΔConv Patch gets the file of the expert it patches") in report, report
    # The pure-Wan-2.1 case, a file from the right model, says nothing about experts.
    assert "experts" not in run(server, two_expert_graph(unet_inputs, FILES))[1]["high"]
