"""ΔConv Attention Locality on a tiny SD1.5 model through the real server; its preset feeds ΔConv Distill."""
import json

from deltaconv_core.families import AttentionSite
from devkit.tiny_models import SITE_COUNTS


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


def test_node_registered(server):
    info = server.get("/object_info/DeltaConvAttentionLocality")["DeltaConvAttentionLocality"]
    assert info["output"] == ["IMAGE", "STRING", "STRING"] and info["category"] == "ΔConv/analysis"
