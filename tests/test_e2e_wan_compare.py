"""ΔConv Compare on Wan video latents through a real ComfyUI server: both models sampled from one seed as KSampler
does, decoded to frames as VAEDecode does (a video is a batch of frames), metrics per frame and per video."""
import math
import re

import pytest
import torch
from graphs import MODELS, VIDEO_LATENTS
from safetensors.torch import load_file

from deltaconv_core.metrics import abs_difference, difference_heatmap, psnr, ssim
from devkit.tiny_models import SITE_COUNTS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
SITES, STEPS = SITE_COUNTS["tiny_wan"], 2
FRAMES = 9  # 3 latent frames decode to 1 + 4 × 2 video frames (Wan's VAE: 4× in time)
FRAME_LINE = re.compile(r"video (\d+), frame (\d+): (?:PSNR ([\d.]+) dB|identical \(PSNR inf), SSIM ([\d.]+)\)?, "
                        r"mean \|Δ\| ([\d.]+), max \|Δ\| ([\d.]+)")
VIDEO_LINE = re.compile(r"video (\d+), mean over (\d+) frames: PSNR ([\d.]+|inf) dB, SSIM ([\d.]+)")


def compare_graph(tag, unet_inputs, weights="tiny_wan_random.safetensors", seed=3, batch=2, start=0.0, end=1.0):
    """Compare(unet, patch) on a Wan video latent beside plain KSampler → VAEDecode branches; IMAGEs saved as is."""
    cond = {"tokens": 16, "dim": MODELS["wan"][1], "pooled_dim": 0}
    sampling = {"seed": seed, "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}
    latent = {**VIDEO_LATENTS["wan"], "inputs": {**VIDEO_LATENTS["wan"]["inputs"], "batch_size": batch}}
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": MODELS["wan"][0], **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 11, **cond}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 12, **cond}},
        "latent": latent,
        "vae": {"class_type": "DeltaConvTestWanVAE", "inputs": {"seed": 0}},
        "load": {"class_type": "DeltaConvLoad", "inputs": {"weights_name": weights}},
        "patch": {"class_type": "DeltaConvPatch", "inputs": {
            "model": ["unet", 0], "deltaconv": ["load", 0], "start_percent": start, "end_percent": end,
            "levels": "all", "strict": False}},
        "compare": {"class_type": "DeltaConvCompare", "inputs": {
            "model": ["unet", 0], "patched_model": ["patch", 0], "vae": ["vae", 0], **sampling}},
        "psnr": {"class_type": "DeltaConvTestShowFloat", "inputs": {"value": ["compare", 3]}},
        "ssim": {"class_type": "DeltaConvTestShowFloat", "inputs": {"value": ["compare", 4]}},
    }
    for slot, name in enumerate(("original", "patched", "difference")):
        g[f"save_{name}"] = {"class_type": "DeltaConvTestSaveTensor",
                             "inputs": {"images": ["compare", slot], "name": f"wan_{tag}_{name}"}}
    for name, model in (("original", "unet"), ("patched", "patch")):
        g[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {"model": [model, 0], **sampling}}
        g[f"decode_{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks_{name}", 0], "vae": ["vae", 0]}}
        g[f"save_ks_{name}"] = {"class_type": "DeltaConvTestSaveTensor",
                                "inputs": {"images": [f"decode_{name}", 0], "name": f"wan_{tag}_ks_{name}"}}
    return g


def run_compare(server, graph):
    outputs = server.run(graph)["outputs"]
    images = {k[len("save_"):]: load_file(v["path"][0])["images"] for k, v in outputs.items() if k.startswith("save_")}
    floats = {k: float(outputs[k]["value"][0]) for k in ("psnr", "ssim")}
    return outputs["compare"]["text"][0], images, floats


def test_video_frames_compared_per_frame_and_per_video(server, unet_inputs):
    report, images, floats = run_compare(server, compare_graph("random", unet_inputs))
    original, patched = images["original"], images["patched"]
    assert original.shape == patched.shape == (2 * FRAMES, 64, 96, 3)  # two videos' frames, as VAEDecode gives
    assert torch.equal(original, images["ks_original"]) and torch.equal(patched, images["ks_patched"])
    assert torch.allclose(images["difference"], difference_heatmap(original, patched))
    p, s, diff = psnr(original, patched), ssim(original, patched), abs_difference(original, patched)
    assert torch.isfinite(p).all() and (s < 1).all()
    assert floats["psnr"] == pytest.approx(p.mean().item(), rel=1e-6)
    assert floats["ssim"] == pytest.approx(s.mean().item(), rel=1e-6)

    rows = FRAME_LINE.findall(report)
    assert [(int(v), int(f)) for v, f, *_ in rows] == [(v, f) for v in (1, 2) for f in range(1, FRAMES + 1)], report
    for i, (_, _, row_psnr, row_ssim, mean, top) in enumerate(rows):
        assert float(row_psnr) == pytest.approx(p[i].item(), abs=0.005)
        assert float(row_ssim) == pytest.approx(s[i].item(), abs=5e-5)
        assert float(mean) == pytest.approx(diff[i].mean().item(), abs=5e-5)
        assert float(top) == pytest.approx(diff[i].max().item(), abs=5e-5)
    videos = VIDEO_LINE.findall(report)
    assert [(int(v), int(n)) for v, n, _, _ in videos] == [(1, FRAMES), (2, FRAMES)], report
    for v, (_, _, video_psnr, video_ssim) in enumerate(videos):
        frames = slice(v * FRAMES, (v + 1) * FRAMES)
        assert float(video_psnr) == pytest.approx(p[frames].mean().item(), abs=0.005)
        assert float(video_ssim) == pytest.approx(s[frames].mean().item(), abs=5e-5)
    assert f"mean over 2 videos of {FRAMES} frames: PSNR {p.mean():.2f} dB, SSIM {s.mean():.4f}" in report, report
    assert "image 1" not in report, report
    assert f"{SITES * STEPS} ran ΔConv block" in report and "original attention" not in report, report


def test_patch_that_never_runs_gives_identical_frames(server, unet_inputs):
    g = compare_graph("never", unet_inputs, seed=4, batch=1, start=1.0, end=1.0)
    for key in [k for k in g if k.startswith(("ks_", "decode_", "save_ks_"))]:
        del g[key]  # the plain branches: the test above checks Compare's frames against them
    report, images, floats = run_compare(server, g)
    assert images["original"].shape[0] == FRAMES and torch.equal(images["original"], images["patched"])
    assert math.isinf(floats["psnr"]) and floats["ssim"] == 1.0
    assert f"video 1, frame {FRAMES}: identical (PSNR inf, SSIM 1.0000)" in report, report
    assert f"video 1, mean over {FRAMES} frames: PSNR inf dB, SSIM 1.0000" in report, report
    assert "ΔConv changed nothing" in report
    assert f"0 ran ΔConv block; original attention: sigma {SITES * STEPS}" in report
