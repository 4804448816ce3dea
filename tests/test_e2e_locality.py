"""ΔConv Attention Locality on the tiny SD1.5 and Wan models through the real server; its preset feeds ΔConv
Distill."""
import copy
import json

import pytest
from graphs import VIDEO_LATENTS

from deltaconv_core.families import AttentionSite
from deltaconv_core.weights import load_weights
from devkit.tiny_models import SITE_COUNTS, has_wan


def test_locality_report_and_preset(server, unet_inputs, pack):
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, "tokens": 16, "dim": 768,
                                                                      "pooled_dim": 0}},
        "locality": {"class_type": "DeltaConvAttentionLocality", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "width": 96, "height": 64, "sigma": 1.0, "seed": 0,
            "max_queries": 16}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["locality", 0]}},
    }
    outputs = server.run(graph)["outputs"]
    assert len(outputs["preview"]["images"]) == 1  # the tiled heat maps are a real IMAGE
    report, preset = outputs["locality"]["text"]
    rows = report.splitlines()[1:]
    assert len(rows) == SITE_COUNTS["tiny_sd15"]
    grids = {r.split(" | ")[1] for r in rows}
    assert grids == {"8x12", "4x6"}  # both resolution levels, non-square
    for r in rows:
        _, _, _k, mass, uniform, erf, suggested = r.split(" | ")
        assert 0.0 <= float(mass) <= 1.0 + 1e-6 and 0.0 <= float(uniform) <= 1.0
        assert int(erf) % 2 == 1 and int(suggested) % 2 == 1 and int(suggested) <= int(erf)
    kernels = json.loads(preset)
    assert len(kernels) == SITE_COUNTS["tiny_sd15"]
    # The preset is what ΔConv Distill's kernel_preset accepts.
    sites = [AttentionSite("p", name, 320, "down", 0, 7) for name in kernels]
    assert pack.nodes.distill.parse_kernel_preset(preset, sites) == kernels


@pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
def test_video_locality_report_and_preset_train_video_blocks(server, unet_inputs, pack):
    """Wan with its empty video latent: per site the spatial and temporal figures, and a [spatial, time] preset
    that ΔConv Distill builds its 3-D blocks with."""
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, "tokens": 16, "dim": 4096,
                                                                      "pooled_dim": 0}},
        "latent": copy.deepcopy(VIDEO_LATENTS["wan"]),
        "locality": {"class_type": "DeltaConvAttentionLocality", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "width": 512, "height": 512, "sigma": 0.5, "seed": 0,
            "max_queries": 16, "latent": ["latent", 0]}},
    }
    report, preset = server.run(graph)["outputs"]["locality"]["text"]
    header, *rows = report.splitlines()
    assert "time ERF (frames)" in header and len(rows) == SITE_COUNTS["tiny_wan"]
    for row in rows:
        cells = dict(zip(header.split(" | "), row.split(" | ")))
        assert cells["grid (frames x h x w)"] == "3x4x6"  # 9 frames → 3 latent frames; 64 × 96 → 8 × 12 → 4 × 6
        assert int(cells["time k"]) == 3 and 0.0 <= float(cells["mass in time k"]) <= 1.0 + 1e-6
        assert int(cells["suggested time k"]) % 2 == 1
    kernels = json.loads(preset)
    assert all(isinstance(v, list) and len(v) == 2 for v in kernels.values())
    graph.pop("locality")
    graph["distill"] = {"class_type": "DeltaConvDistill", "inputs": {
        "model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "stage": "A", "steps": 1,
        "learning_rate": 1e-3, "batch_size": 1, "seed": 0, "save_every": 0, "filename_prefix": "wan_locality",
        "kernel_preset": preset, "allow_cpu": True, "training_dtype": "fp32"}}
    graph["save"] = {"class_type": "DeltaConvSave", "inputs": {"deltaconv": ["distill", 0],
                                                               "filename": "wan_locality_blocks", "overwrite": True}}
    weights = load_weights(server.run(graph)["outputs"]["save"]["text"][0])
    assert {name: [cfg.kernel_size, cfg.time_kernel] for name, (cfg, _) in weights.students.items()} == kernels


def test_node_registered(server):
    info = server.get("/object_info/DeltaConvAttentionLocality")["DeltaConvAttentionLocality"]
    assert info["output"] == ["IMAGE", "STRING", "STRING"] and info["category"] == "ΔConv/analysis"
