"""Site discovery on ComfyUI's real model classes at full size (built on the meta device: no memory, no weights)."""
import pytest
import torch
from torch import nn

from deltaconv_core.families import (
    FAMILIES,
    TOKENS_REARRANGED,
    UnsupportedModelError,
    find_attention_sites,
    select_levels,
)
from devkit.tiny_models import has_pixart, has_wan

_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
           "use_temporal_resblock": False}
_SD = {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
       "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
       "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
       "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
_XL = {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "channel_mult": [1, 2, 4],
       "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64}
# ComfyUI's own configs (comfy/model_detection.py, unet_config_from_diffusers_unet) and expected site counts.
CONFIGS = {
    "SD15": ({**_SD, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8}, "sd1", 16),
    "SD21": ({**_SD, "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64}, "sd2", 16),
    "SDXL": ({**_XL, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}, "sdxl", 70),
    "SSD_1B": ({**_XL, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 4, 4],
                "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]}, "sdxl", 34),
    "Segmind_Vega": ({**_XL, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
                      "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]},
                     "sdxl", 15),
    "KOALA_700M": ({**_XL, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5],
                    "transformer_depth_middle": -2, "transformer_depth_output": [0, 0, 2, 2, 5, 5]}, "sdxl", 21),
}
# The released blocks' kernel size per diffusers attention block.
SD1_KERNELS = {"down_blocks.0": 7, "down_blocks.1": 9, "down_blocks.2": 5, "mid_block": 3, "up_blocks.1": 5,
               "up_blocks.2": 9, "up_blocks.3": 11}
SDXL_KERNELS = {"down_blocks.1": 9, "down_blocks.2": 7, "mid_block": 9, "up_blocks.0": 9, "up_blocks.1": 13}
SD1_CHANNELS = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280,
                "up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}


def build_meta_unet(name):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**CONFIGS[name][0], device="meta", operations=comfy.ops.disable_weight_init)


def _block(name):
    return ".".join(name.split(".")[:2]) if name.startswith(("down", "up")) else "mid_block"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_site_counts_and_families(name):
    _, family, count = CONFIGS[name]
    found = find_attention_sites(build_meta_unet(name))
    assert found.family == family
    assert len(found.sites) == count
    assert len({s.path for s in found.sites}) == count and len({s.name for s in found.sites}) == count


def test_sd15_names_channels_kernels_match_the_official_layout():
    found = find_attention_sites(build_meta_unet("SD15"))
    expected = ([f"down_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in range(3) for a in range(2)]
                + ["mid_block.attentions.0.transformer_blocks.0"]
                + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in range(1, 4) for a in range(3)])
    assert [s.name for s in found.sites] == expected
    for s in found.sites:
        assert s.kernel_size == SD1_KERNELS[_block(s.name)], s
        assert s.channels == SD1_CHANNELS[_block(s.name)], s
    assert found.sites[0].path == "input_blocks.1.1.transformer_blocks.0.attn1"
    assert found.sites[6].path == "middle_block.1.transformer_blocks.0.attn1"
    assert found.sites[-1].path == "output_blocks.11.1.transformer_blocks.0.attn1"
    assert found.levels() == [0, 1, 2, 3]


def test_sdxl_names_match_the_official_70_block_list():
    found = find_attention_sites(build_meta_unet("SDXL"))
    expected = ([f"down_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(2) for t in range(2)]
                + [f"down_blocks.2.attentions.{a}.transformer_blocks.{t}" for a in range(2) for t in range(10)]
                + [f"mid_block.attentions.0.transformer_blocks.{t}" for t in range(10)]
                + [f"up_blocks.0.attentions.{a}.transformer_blocks.{t}" for a in range(3) for t in range(10)]
                + [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(3) for t in range(2)])
    assert [s.name for s in found.sites] == expected
    assert all(s.kernel_size == SDXL_KERNELS[_block(s.name)] for s in found.sites)
    assert {s.channels for s in found.sites if s.name.startswith("up_blocks.1")} == {640}
    assert select_levels(found, "finest") == {1}  # SDXL's first level has no attention


@pytest.mark.skipif(not has_pixart(), reason="this ComfyUI has no PixArt")
def test_pixart_28_sites():
    import comfy.ops
    from comfy.ldm.pixart.pixartms import PixArtMS

    model = PixArtMS(depth=28, micro_condition=False, device="meta", operations=comfy.ops.disable_weight_init)
    found = find_attention_sites(model)
    assert found.family == "pixart" and found.patch_size == 2 and len(found.sites) == 28
    assert found.sites[5].name == "transformer_blocks.5" and found.sites[5].path == "blocks.5.attn"
    assert {(s.channels, s.kernel_size) for s in found.sites} == {(1152, 13)}
    assert found.default_gate == "sigmoid"


@pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
@pytest.mark.parametrize("config,sites", [
    ({"model_type": "t2v", "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30}, 30),  # 2.1 1.3B
    ({"model_type": "i2v", "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}, 40),  # 2.1 14B I2V
    ({"model_type": "t2v", "dim": 3072, "ffn_dim": 14336, "num_heads": 24, "num_layers": 30, "in_dim": 48,
      "out_dim": 48}, 30),  # 2.2 TI2V 5B
])
def test_wan_sites(config, sites):
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    found = find_attention_sites(model)
    assert found.family == "wan" and found.patch_size == (1, 2, 2) and len(found.sites) == sites
    assert found.sites[5].name == "blocks.5" and found.sites[5].path == "blocks.5.self_attn"
    assert {(s.channels, s.level) for s in found.sites} == {(config["dim"], 0)}
    assert found.variant == f"Wan 2.x {config['model_type'].upper()} ({sites} self-attention sites)"


def test_unknown_architecture_lists_what_was_found():
    class Joint(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList([nn.Linear(4, 4)])
            self.img_in = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match=r"Joint.*double_blocks \(ModuleList\).*img_in \(Linear\)"):
        find_attention_sites(Joint())


def test_level_choices():
    found = find_attention_sites(build_meta_unet("SD15"))
    assert select_levels(found, "all") == {0, 1, 2, 3}
    assert select_levels(found, "finest_two") == {0, 1}
    with pytest.raises(ValueError, match="levels must be one of"):
        select_levels(found, "coarsest")


def test_meta_build_has_no_storage():
    # Guard for the approach itself: these full-size models really are on meta (no memory, instant).
    assert next(build_meta_unet("SDXL").parameters()).device == torch.device("meta")


@pytest.mark.parametrize("options, tokens, grid", [
    ({"activations_shape": [2, 320, 7, 5]}, 35, (7, 5)),
    ({"activations_shape": [1, 320, 7, 5]}, 35, TOKENS_REARRANGED),  # another batch: tiles stacked (HyperTile)
    ({"activations_shape": [2, 320, 7, 5]}, 18, TOKENS_REARRANGED),  # merged tokens (ToMe)
    ({"original_shape": [2, 4, 13, 9]}, 35, (7, 5)),  # older ComfyUI: the latent, halved (rounding up) per level
    ({"original_shape": [2, 4, 13, 9]}, 11, TOKENS_REARRANGED),
])
def test_unet_token_grid(options, tokens, grid):
    sd1 = FAMILIES["sd1"]
    sites = sd1.find_sites(build_meta_unet("SD15"))
    assert sd1.token_grid(sites, (2, tokens, 320), {"transformer_options": options}) == grid
