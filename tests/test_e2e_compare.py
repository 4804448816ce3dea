"""ΔConv Compare through the real server on the tiny SD1.5 model: its images are KSampler's, \
its numbers the metrics'."""
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from deltaconv_core.metrics import abs_difference, difference_heatmap, psnr, ssim
from devkit.comfy_server import ComfyError

STEPS, SITES = 3, 7
IMAGE_LINE = re.compile(r"image (\d+): (?:PSNR ([\d.]+) dB|identical \(PSNR inf), SSIM ([\d.]+)\)?, "
                        r"mean \|Δ\| ([\d.]+), max \|Δ\| ([\d.]+)")


def compare_graph(tag, unet_inputs, weights="tiny_sd15_zero.safetensors", start=0.0, end=1.0, patched=("patch", 0),
                  seed=3, batch=2):
    """Compare(unet, patch) beside plain KSampler → VAEDecode branches for both models; every IMAGE saved as is."""
    cond = {"tokens": 16, "dim": 768, "pooled_dim": 0}
    sampling = {"seed": seed, "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 11, **cond}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 12, **cond}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "load": {"class_type": "DeltaConvLoad", "inputs": {"weights_name": weights}},
        "patch": {"class_type": "DeltaConvPatch", "inputs": {
            "model": ["unet", 0], "deltaconv": ["load", 0], "start_percent": start, "end_percent": end,
            "levels": "all", "strict": False}},
        "compare": {"class_type": "DeltaConvCompare", "inputs": {
            "model": ["unet", 0], "patched_model": list(patched), "vae": ["vae", 0], **sampling}},
        "psnr": {"class_type": "DeltaConvTestShowFloat", "inputs": {"value": ["compare", 3]}},
        "ssim": {"class_type": "DeltaConvTestShowFloat", "inputs": {"value": ["compare", 4]}},
    }
    for slot, name in enumerate(("original", "patched", "difference")):
        g[f"save_{name}"] = {"class_type": "DeltaConvTestSaveTensor",
                             "inputs": {"images": ["compare", slot], "name": f"{tag}_{name}"}}
    for name, model in (("original", "unet"), ("patched", "patch")):
        g[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {"model": [model, 0], **sampling}}
        g[f"decode_{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks_{name}", 0], "vae": ["vae", 0]}}
        g[f"save_ks_{name}"] = {"class_type": "DeltaConvTestSaveTensor",
                                "inputs": {"images": [f"decode_{name}", 0], "name": f"{tag}_ks_{name}"}}
    return g


def run_compare(server, graph):
    outputs = server.run(graph)["outputs"]
    images = {k[len("save_"):]: load_file(v["path"][0])["images"] for k, v in outputs.items() if k.startswith("save_")}
    floats = {k: float(outputs[k]["value"][0]) for k in ("psnr", "ssim")}
    return outputs["compare"]["text"][0], images, floats


def test_node_registered(server):
    info = server.get("/object_info/DeltaConvCompare")["DeltaConvCompare"]
    assert info["display_name"] == "ΔConv Compare" and info["category"] == "ΔConv/analysis"
    assert list(info["input"]["required"]) == ["model", "patched_model", "vae", "positive", "negative",
                                               "latent_image", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                               "denoise"]
    assert info["output"] == ["IMAGE", "IMAGE", "IMAGE", "FLOAT", "FLOAT", "STRING"]
    assert info["output_name"] == ["original", "patched", "difference", "psnr", "ssim", "report"]


def test_zero_blocks_against_original(server, unet_inputs):
    report, images, floats = run_compare(server, compare_graph("zero", unet_inputs))
    original, patched = images["original"], images["patched"]
    assert original.shape == patched.shape == (2, 64, 64, 3)
    # The same sampling as KSampler, from the same noise: bit-identical to the plain branches.
    assert torch.equal(original, images["ks_original"]) and torch.equal(patched, images["ks_patched"])
    p, s = psnr(original, patched), ssim(original, patched)
    assert torch.isfinite(p).all() and (s < 1).all()
    assert floats["psnr"] == pytest.approx(p.mean().item(), rel=1e-6)
    assert floats["ssim"] == pytest.approx(s.mean().item(), rel=1e-6)
    assert images["difference"].shape == (2, 64, 64, 3)
    assert torch.allclose(images["difference"], difference_heatmap(original, patched))
    rows = IMAGE_LINE.findall(report)
    assert [int(r[0]) for r in rows] == [1, 2], report
    diff = abs_difference(original, patched)
    for i, (_, row_psnr, row_ssim, mean, top) in enumerate(rows):
        assert float(row_psnr) == pytest.approx(p[i].item(), abs=0.005)
        assert float(row_ssim) == pytest.approx(s[i].item(), abs=5e-5)
        assert float(mean) == pytest.approx(diff[i].mean().item(), abs=5e-5)
        assert float(top) == pytest.approx(diff[i].max().item(), abs=5e-5)
    assert f"pale yellow = {diff.max().item():.4f}" in report
    assert f"{SITES * STEPS} ran ΔConv" in report and "original attention" not in report
    # Present, not judged: rounded to 0.01 s, a fast machine may print 0.00 for the tiny model.
    assert re.search(r"original \d+\.\d\d s, patched \d+\.\d\d s", report)


def test_patch_that_never_runs_gives_identical_images(server, unet_inputs):
    report, images, floats = run_compare(server, compare_graph(
        "never", unet_inputs, weights="tiny_sd15_random.safetensors", start=1.0, end=1.0, seed=4, batch=1))
    assert torch.equal(images["original"], images["patched"])
    assert math.isinf(floats["psnr"]) and floats["ssim"] == 1.0
    assert "image 1: identical (PSNR inf, SSIM 1.0000)" in report and "ΔConv changed nothing" in report
    assert f"0 ran ΔConv block; original attention: sigma {SITES * STEPS}" in report
    assert images["difference"].abs().max() < 0.02  # the colour map's black


def test_unpatched_model_refused_with_the_fix(server, unet_inputs):
    graph = compare_graph("unpatched", unet_inputs, patched=("unet", 0), seed=5, batch=1)
    # (the message comes back JSON-escaped: \u0394 for Δ)
    with pytest.raises(ComfyError, match=r"carries no .*Conv patch.*connect the MODEL output of .*Conv Patch to "
                                         r"patched_model"):
        server.run(graph)
