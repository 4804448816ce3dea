"""ΔConv Load + Patch through a real ComfyUI server: POST /prompt, read /history."""
import os

import pytest
from graphs import digest, txt2img, with_model_node

from devkit.comfy_server import ComfyError
from devkit.tiny_models import SITE_COUNTS, has_pixart

STEPS = 3


def families():
    return ["sd15", "sdxl"] + (["pixart"] if has_pixart() else [])


def test_nodes_registered(server):
    info = server.get("/object_info")
    patch = info["DeltaConvPatch"]
    assert patch["display_name"] == "ΔConv Patch" and patch["category"] == "ΔConv"
    assert list(patch["input"]["required"]) == ["model", "deltaconv", "start_percent", "end_percent", "levels",
                                                "strict"]
    assert patch["output"] == ["MODEL", "STRING"]
    files = info["DeltaConvLoad"]["input"]["required"]["weights_name"][0]
    assert "tiny_sd15_random.safetensors" in files and "tiny_sd15_zero.safetensors" in files


@pytest.mark.parametrize("family", families())
def test_every_site_replaced(server, unet_inputs, family):
    entry = server.run(txt2img(family, f"tiny_{family}_random.safetensors", steps=STEPS, unet_inputs=unet_inputs))
    d = digest(entry)
    sites = SITE_COUNTS[f"tiny_{family}"]
    assert d["patched_sites"] == sites
    assert d["finite"] and d["mean_abs"] > 0
    size = {"sd15": 8, "sdxl": 8, "pixart": 40}[family]
    assert d["shape"] == [1, 4, size, size]
    # Every self-attention call of every step went through ΔConv, none to the fallback.
    calls = d["counts"]
    assert set(calls) == {"deltaconv"}, calls
    assert calls["deltaconv"] % sites == 0 and calls["deltaconv"] >= sites * STEPS


def test_patched_image_saved(server, unet_inputs):
    entry = server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=5, decode=True, unet_inputs=unet_inputs))
    image = entry["outputs"]["save"]["images"][0]
    assert os.path.getsize(os.path.join(server.base, "output", image["subfolder"], image["filename"])) > 0


def test_unpatched_model_bit_identical_before_and_after(server, unet_inputs):
    before = server.run(txt2img("sd15", None, seed=21, unet_inputs=unet_inputs))
    patched = server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=21, unet_inputs=unet_inputs))
    after = server.run(txt2img("sd15", None, seed=21, unet_inputs=unet_inputs))
    cached = [m[1].get("nodes", []) for m in after["status"]["messages"] if m[0] == "execution_cached"]
    assert "sampler" not in [n for nodes in cached for n in nodes], "the sampler must really run again"
    assert digest(patched)["sha256"] != digest(before)["sha256"]
    assert digest(after)["sha256"] == digest(before)["sha256"]


def test_zero_blocks_equal_zeroed_attention(server, unet_inputs):
    zero_blocks = server.run(txt2img("sd15", "tiny_sd15_zero.safetensors", seed=31, unet_inputs=unet_inputs))
    zeroed_attn = server.run(with_model_node(txt2img("sd15", None, seed=31, unet_inputs=unet_inputs),
                                             "DeltaConvTestZeroAttn1", {}))
    plain = server.run(txt2img("sd15", None, seed=31, unet_inputs=unet_inputs))
    assert digest(zero_blocks)["counts"] == {"deltaconv": 7 * STEPS}
    assert digest(zero_blocks)["sha256"] == digest(zeroed_attn)["sha256"]
    assert digest(zero_blocks)["sha256"] != digest(plain)["sha256"]


def test_two_patched_clones_in_one_graph_do_not_interfere(server, unet_inputs):
    both = server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=41, unet_inputs=unet_inputs,
                              extra_models=[("_b", "tiny_sd15_zero.safetensors"), ("_c", None)]))
    alone_a = server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=41, unet_inputs=unet_inputs))
    alone_b = server.run(txt2img("sd15", "tiny_sd15_zero.safetensors", seed=41, unet_inputs=unet_inputs))
    alone_c = server.run(txt2img("sd15", None, seed=41, unet_inputs=unet_inputs))
    assert digest(both)["sha256"] == digest(alone_a)["sha256"]
    assert digest(both, "_b")["sha256"] == digest(alone_b)["sha256"]
    assert digest(both, "_c")["sha256"] == digest(alone_c)["sha256"]
    assert len({digest(both, s)["sha256"] for s in ("", "_b", "_c")}) == 3


def test_sigma_range_is_honoured(server, unet_inputs):
    steps = 4
    half = digest(server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=51, steps=steps, end=0.5,
                                     unet_inputs=unet_inputs)))
    calls = half["counts"]
    assert calls["deltaconv"] > 0 and calls["attention:sigma"] > 0, calls
    assert calls["deltaconv"] % 7 == 0 and calls["attention:sigma"] % 7 == 0  # whole steps switch, not single sites
    # An empty range never runs ΔConv and reproduces the unpatched model exactly.
    never = digest(server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=51, steps=steps, start=1.0,
                                      end=1.0, unet_inputs=unet_inputs)))
    plain = digest(server.run(txt2img("sd15", None, seed=51, steps=steps, unet_inputs=unet_inputs)))
    assert never["counts"] == {"attention:sigma": 7 * steps}
    assert never["sha256"] == plain["sha256"]


def test_finest_level_only(server, unet_inputs):
    d = digest(server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=61, levels="finest",
                                  unet_inputs=unet_inputs)))
    assert d["patched_sites"] == 3  # down level 0 and the two up blocks at level 0; level 1 keeps attention
    assert d["counts"] == {"deltaconv": 3 * STEPS}


def test_tome_rearranged_tokens_fall_back_per_call(server, unet_inputs):
    graph = with_model_node(txt2img("sd15", "tiny_sd15_random.safetensors", seed=71, unet_inputs=unet_inputs),
                            "TomePatchModel", {"ratio": 0.5})
    calls = digest(server.run(graph))["counts"]
    assert calls["deltaconv"] > 0 and calls["attention:tokens rearranged"] > 0, calls


def test_wrong_family_refused_with_clear_message(server, unet_inputs):
    with pytest.raises(ComfyError, match="made for SDXL"):
        server.run(txt2img("sd15", "tiny_sdxl_random.safetensors", seed=81, unet_inputs=unet_inputs))


@pytest.mark.skipif(not has_pixart(), reason="this ComfyUI has no PixArt")
def test_pixart_sigma_range_through_the_model_wrapper(server, unet_inputs):
    # PixArt blocks see no sigma: an APPLY_MODEL wrapper hands it to the ΔConv modules.
    calls = digest(server.run(txt2img("pixart", "tiny_pixart_random.safetensors", seed=91, steps=4, end=0.5,
                                      unet_inputs=unet_inputs)))["counts"]
    assert calls["deltaconv"] > 0 and calls["attention:sigma"] > 0, calls
    assert calls["deltaconv"] + calls["attention:sigma"] == 4, calls
