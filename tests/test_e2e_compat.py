"""ΔConv next to the rest of a ComfyUI graph, end to end on a real server: ControlNet, img2img, LoRA, attn2
patches (IP-Adapter's mechanism), SAG/PAG and HyperTile."""
import os

import pytest
import torch
from graphs import digest, txt2img, with_model_node
from PIL import Image
from safetensors.torch import save_file

SITES = 7
MIDDLE = "mid_block.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def image(server):
    """A 64×64 test image in the server's input folder."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(os.path.join(server.base, "input", "deltaconv_compat.png"))
    return "deltaconv_compat.png"


def patched(unet_inputs, seed, **kw):
    return txt2img("sd15", "tiny_sd15_random.safetensors", seed=seed, unet_inputs=unet_inputs, **kw)


def has_node(server, name):
    return name in server.get("/object_info")


def test_controlnet_on_patched_model(server, unet_inputs, image):
    g = patched(unet_inputs, 101)
    g["image"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["cnet"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny_sd15_controlnet.safetensors"}}
    g["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cnet", 0], "image": ["image", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["sampler"]["inputs"].update(positive=["apply", 0], negative=["apply", 1])
    with_control = digest(server.run(g))
    without = digest(server.run(patched(unet_inputs, 101)))
    assert with_control["finite"] and with_control["counts"] == {"deltaconv": SITES * 3}
    assert with_control["sha256"] != without["sha256"]  # the ControlNet really acted (it keeps its own attention)


def test_img2img_on_patched_model(server, unet_inputs, image):
    g = patched(unet_inputs, 102)
    g["image"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}}
    g["sampler"]["inputs"].update(latent_image=["encode", 0], denoise=0.6)
    d = digest(server.run(g))
    assert d["finite"] and d["counts"]["deltaconv"] > 0 and set(d["counts"]) == {"deltaconv"}


def _lora(server, name, layers):
    """A tiny kohya-format LoRA on the given sublayers of every transformer block of tiny_sd15."""
    g = torch.Generator().manual_seed(len(name))
    tensors = {}
    for block in ("input_blocks_1_1", "input_blocks_3_1", "middle_block_1", "output_blocks_0_1",
                  "output_blocks_1_1", "output_blocks_2_1", "output_blocks_3_1"):
        for layer, (d_in, d_out) in layers.items():
            key = f"lora_unet_{block}_transformer_blocks_0_{layer}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, d_in, generator=g) * 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(d_out, 4, generator=g) * 0.5
    save_file(tensors, os.path.join(server.base, "models", "loras", name))
    return name


def test_lora_on_replaced_attn1_has_no_effect_other_lora_does(server, unet_inputs):
    attn1 = _lora(server, "tiny_attn1.safetensors", {f"attn1_to_{p}": (320, 320) for p in ("q", "k", "v")})
    others = _lora(server, "tiny_attn2_ff.safetensors", {"attn2_to_q": (320, 320), "ff_net_2": (1280, 320)})

    def run(lora):
        g = patched(unet_inputs, 103)
        if lora:
            with_model_node(g, "LoraLoaderModelOnly", {"lora_name": lora, "strength_model": 1.0}, name="lora")
        return digest(server.run(g))["sha256"]

    plain = run(None)
    assert run(attn1) == plain  # attn1's q/k/v are bypassed while ΔConv runs: documented, and warned in the report
    assert run(others) != plain
    assert "weight patches (LoRA/merges) touch replaced self-attention layers" in server.log_text()


def test_attn2_replace_patches_compose(server, unet_inputs):
    g = patched(unet_inputs, 104)
    g["attn2"] = {"class_type": "DeltaConvTestAttn2Zero", "inputs": {"model": ["patch", 0]}}
    g["sampler"]["inputs"]["model"] = g["digest"]["inputs"]["model"] = ["attn2", 0]
    with_attn2 = digest(server.run(g))
    plain = digest(server.run(patched(unet_inputs, 104)))
    assert with_attn2["counts"] == {"deltaconv": SITES * 3}
    assert with_attn2["sha256"] != plain["sha256"]


def _guided(server, unet_inputs, node, inputs, seed):
    if not has_node(server, node):
        pytest.skip(f"this ComfyUI has no {node}")
    g = patched(unet_inputs, seed)
    g["guide"] = {"class_type": node, "inputs": {"model": ["patch", 0], **inputs}}
    g["sampler"]["inputs"]["model"] = g["digest"]["inputs"]["model"] = ["guide", 0]
    d = digest(server.run(g))
    assert d["finite"]
    return d["sites"]


def test_sag_keeps_the_middle_block_on_attention(server, unet_inputs):
    # SAG's attn1 replace on ("middle", 0) records real attention maps through the kept projections.
    sites = _guided(server, unet_inputs, "SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}, 105)
    assert MIDDLE not in sites and len(sites) == SITES - 1, sites


def test_pag_perturbs_the_middle_block_only_in_its_extra_pass(server, unet_inputs):
    # PAG's identity-attention replace applies to its perturbed pass; the normal pass runs ΔConv everywhere.
    sites = _guided(server, unet_inputs, "PerturbedAttentionGuidance", {"scale": 1.0}, 107)
    others = {v for k, v in sites.items() if k != MIDDLE}
    assert len(sites) == SITES and len(others) == 1 and sites[MIDDLE] * 2 == others.pop(), sites


def test_hypertile_tiles_fall_back_per_call(server, unet_inputs):
    g = with_model_node(patched(unet_inputs, 106), "HyperTile",
                        {"tile_size": 32, "swap_size": 1, "max_depth": 0, "scale_depth": False})
    g["latent"]["inputs"].update(width=256, height=256)
    calls = digest(server.run(g))["counts"]
    assert calls["attention:tokens rearranged"] > 0 and calls["deltaconv"] > 0, calls
