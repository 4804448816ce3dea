"""Tiny, seeded, randomly initialised models built with ComfyUI's own classes, which its detection accepts.

ComfyUI's model detection (`comfy.model_detection`) matches a state dict's shapes against its catalogue: it pins
model_channels 320 and context_dim 768 (SD1.5), the transformer depth lists (SDXL family: here KOALA-700M's), the
hidden size 1152 (PixArt) and Wan's 128 channels per head (its text width is its class default, 4096: T5).
Everything else (levels, depth, image size, frames) is made small so a step takes milliseconds. Each model
family's adapter names its tiny model (FamilyAdapter.tiny_model, a key of TINY_MODELS).
"""
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

SD15_TINY = {  # 2 levels → attention at two resolutions: 7 self-attention sites
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "channel_mult": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "use_linear_in_transformer": False,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
KOALA_TINY = {  # KOALA-700M depths (an SDXL subclass), every level at 320 channels: 21 sites
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 1, 1], "transformer_depth": [0, 2, 5], "transformer_depth_output": [0, 0, 2, 2, 5, 5],
    "transformer_depth_middle": -2, "context_dim": 2048, "num_head_channels": 64, "use_linear_in_transformer": True,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_checkpoint": False, "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The families told apart by context width alone, built in-process only (the adapter tests), never written.
SD2_TINY = {**{k: v for k, v in SD15_TINY.items() if k != "num_heads"}, "context_dim": 1024,
            "use_linear_in_transformer": True, "num_head_channels": 64}
OTHER_UNET_TINY = {**SD15_TINY, "context_dim": 512}  # a width no known family has: the "unet" family
# Wan 2.1 T2V's layout; detection reads dim (heads = dim // 128), ffn_dim, layers and in_dim from the shapes.
WAN_TINY = {"model_type": "t2v", "dim": 256, "ffn_dim": 256, "num_heads": 2, "num_layers": 2, "in_dim": 16,
            "out_dim": 16, "text_dim": 4096}
# Wan 2.2 TI2V 5B's layout: 48 latent channels in and out (its VAE compresses 16× in space), detected as WAN22_T2V.
WAN22_5B_TINY = {**WAN_TINY, "in_dim": 48, "out_dim": 48}
SITE_COUNTS = {"tiny_sd15": 7, "tiny_sd15_inpaint": 7, "tiny_sdxl": 21, "tiny_pixart": 1, "tiny_wan": 2,
               "tiny_wan22_5b": 2}


def init_random(module: nn.Module, seed: int) -> nn.Module:
    """ComfyUI's layers skip initialisation (torch.empty): give every parameter a real, seeded value."""
    torch.manual_seed(seed)
    done = set()
    for m in module.modules():
        for cls in (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding):
            if isinstance(m, cls):
                cls.reset_parameters(m)  # the stock torch init; ComfyUI's subclasses override it with a no-op
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)):
            done.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0, 0.02)
    return module


def _save(module: nn.Module, path: str, dtype=torch.float16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}, path)


def build_unet(config: dict, seed: int, in_channels: int = 4) -> nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = {**config, "in_channels": in_channels}
    return init_random(UNetModel(**cfg, operations=comfy.ops.disable_weight_init), seed)


def build_pixart(seed: int) -> nn.Module:
    import comfy.ops
    from comfy.ldm.pixart.pixartms import PixArtMS

    model = PixArtMS(depth=1, input_size=64, pe_interpolation=1, micro_condition=False, model_max_length=16,
                     operations=comfy.ops.disable_weight_init)
    return init_random(model, seed)


def build_wan(seed: int, config: dict = WAN_TINY) -> nn.Module:
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = init_random(WanModel(**config, operations=comfy.ops.disable_weight_init), seed)
    with torch.no_grad():  # RMSNorm weights near zero would zero q and k: make them the identity, as trained ones are
        for name, p in model.named_parameters():
            if ".norm_q." in name or ".norm_k." in name:
                p.fill_(1.0)
    return model


def build_controlnet(seed: int) -> nn.Module:
    """A ControlNet matching SD15_TINY, in the classic `control_model.*` layout ComfyUI's loader detects."""
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    cfg = {k: v for k, v in SD15_TINY.items() if k not in ("out_channels", "transformer_depth_output")}
    return init_random(ControlNet(hint_channels=3, **cfg, operations=comfy.ops.disable_weight_init), seed)


def build_taesd(seed: int):
    from comfy.taesd.taesd import TAESD

    return init_random(TAESD(), seed)


def write_block_files(name: str, module: nn.Module, folder: str, out: dict):
    """Random and zero-output ΔConv blocks (video: the random ones with a random conv_time, so that it matters),
    and mediator attention from the model's own attention (with a random DWC, so that it matters; default
    schedule), for one tiny model in our own format (read by ΔConv Load)."""
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights, save_weights

    sites = find_attention_sites(module)
    g = torch.Generator().manual_seed(9)
    for variant, zero in (("random", False), ("zero", True)):
        weights = DeltaConvWeights.fresh(sites, seed=7, zero_output=zero)
        for _, state in weights.students.values() if not zero else ():
            if "conv_time.weight" in state:
                state["conv_time.weight"] = torch.randn(state["conv_time.weight"].shape, generator=g) * 0.1
        out[f"{name}_{variant}"] = save_weights(weights, os.path.join(folder, f"{name}_{variant}.safetensors"))
    mediators = DeltaConvWeights.fresh_mediators(sites, module)
    g = torch.Generator().manual_seed(8)
    for _, state in mediators.students.values():
        for dwc in ("dwc.weight", "dwc_time.weight"):
            if dwc in state:
                state[dwc] = torch.randn(state[dwc].shape, generator=g) * 0.1
    out[f"{name}_mediators"] = save_weights(mediators, os.path.join(folder, f"{name}_mediators.safetensors"))


class TinyModel(NamedTuple):
    build: Callable[[int], nn.Module]  # seed → the diffusion model
    context_dim: int  # width of the text conditioning its forward takes
    pooled_dim: int | None = None  # width of the pooled conditioning `y` (SDXL), when it takes one
    channels: int = 4  # latent channels
    frames: int = 0  # latent frames of a video model's inputs (0: an image model, latents [B, C, H, W])
    timestep_arg: str = "timesteps"  # what its forward calls the timesteps

    def inputs(self, latent_hw, seed: int = 0) -> dict:
        """Keyword arguments of one forward of the model at a latent size, batch 1."""
        g = torch.Generator().manual_seed(seed)
        shape = (1, self.channels, *((self.frames,) if self.frames else ()), *latent_hw)
        inputs = {"x": torch.randn(shape, generator=g), self.timestep_arg: torch.full((1,), 500.0),
                  "context": torch.randn(1, 16, self.context_dim, generator=g)}  # PixArt's model_max_length
        if self.pooled_dim:
            inputs["y"] = torch.randn(1, self.pooled_dim, generator=g)
        return inputs


# The tiny model of each family, under the name its adapter gives.
TINY_MODELS = {"tiny_sd15": TinyModel(lambda seed: build_unet(SD15_TINY, seed), SD15_TINY["context_dim"]),
               "tiny_sd2": TinyModel(lambda seed: build_unet(SD2_TINY, seed), SD2_TINY["context_dim"]),
               "tiny_sdxl": TinyModel(lambda seed: build_unet(KOALA_TINY, seed), KOALA_TINY["context_dim"],
                                      KOALA_TINY["adm_in_channels"]),
               "tiny_unet": TinyModel(lambda seed: build_unet(OTHER_UNET_TINY, seed), OTHER_UNET_TINY["context_dim"]),
               "tiny_pixart": TinyModel(build_pixart, 4096),  # PixArt: T5-XXL captions
               "tiny_wan": TinyModel(build_wan, WAN_TINY["text_dim"], channels=16, frames=3, timestep_arg="timestep"),
               "tiny_wan22_5b": TinyModel(lambda seed: build_wan(seed, WAN22_5B_TINY), WAN22_5B_TINY["text_dim"],
                                          channels=48, frames=3, timestep_arg="timestep")}


def write_tiny_models(base) -> dict:
    """Writes models under `base/models/...`; returns {name: path} plus "base"."""
    base = str(base)
    unet_dir = os.path.join(base, "models", "unet")
    blocks_dir = os.path.join(base, "models", "deltaconv")
    out = {"base": base}
    builders = [("tiny_sd15", lambda: TINY_MODELS["tiny_sd15"].build(1)),
                ("tiny_sd15_inpaint", lambda: build_unet(SD15_TINY, 2, 9)),
                ("tiny_sdxl", lambda: TINY_MODELS["tiny_sdxl"].build(3))]
    if has_pixart():
        builders.append(("tiny_pixart", lambda: TINY_MODELS["tiny_pixart"].build(4)))
    if has_wan():
        builders.append(("tiny_wan", lambda: TINY_MODELS["tiny_wan"].build(9)))
    if has_wan22_5b():
        builders.append(("tiny_wan22_5b", lambda: TINY_MODELS["tiny_wan22_5b"].build(10)))
    for name, build in builders:
        module = build()
        out[name] = os.path.join(unet_dir, f"{name}.safetensors")
        _save(module, out[name])
        if name != "tiny_sd15_inpaint":
            write_block_files(name, module, blocks_dir, out)
    controlnet = build_controlnet(6)
    out["tiny_controlnet"] = os.path.join(base, "models", "controlnet", "tiny_sd15_controlnet.safetensors")
    os.makedirs(os.path.dirname(out["tiny_controlnet"]), exist_ok=True)
    save_file({f"control_model.{k}": v.half().contiguous() for k, v in controlnet.state_dict().items()},
              out["tiny_controlnet"])
    taesd = build_taesd(5)
    approx = os.path.join(base, "models", "vae_approx")
    for prefix in ("taesd", "taesdxl"):
        for part in ("encoder", "decoder"):
            _save(getattr(taesd, f"taesd_{part}"), os.path.join(approx, f"{prefix}_{part}.safetensors"))
    for folder in ("loras", "controlnet", "vae", "checkpoints", "clip"):
        os.makedirs(os.path.join(base, "models", folder), exist_ok=True)
    return out


def has_pixart() -> bool:
    import importlib.util

    return importlib.util.find_spec("comfy.ldm.pixart") is not None



def has_wan() -> bool:
    import importlib.util

    return importlib.util.find_spec("comfy.ldm.wan") is not None


def has_wan22_5b() -> bool:
    """Whether this ComfyUI detects Wan 2.2 TI2V 5B (WAN22_T2V: 48 latent channels, the Wan 2.2 latent format)."""
    import comfy.supported_models

    return has_wan() and hasattr(comfy.supported_models, "WAN22_T2V")
