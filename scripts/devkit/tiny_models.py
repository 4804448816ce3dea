"""Tiny, seeded, randomly initialised models built with ComfyUI's own classes, which its detection accepts.

ComfyUI's model detection (`comfy.model_detection`) matches a state dict's shapes against its catalogue: it pins
model_channels 320 and context_dim 768 (SD1.5), the transformer depth lists (SDXL family: here KOALA-700M's) and the
hidden size 1152 (PixArt). Everything else (levels, depth, image size) is made small so a step takes milliseconds.
"""
import os

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
SITE_COUNTS = {"tiny_sd15": 7, "tiny_sd15_inpaint": 7, "tiny_sdxl": 21, "tiny_pixart": 1}


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
    """Random and zero-output ΔConv blocks, and mediator attention from the model's own attention (with a random
    DWC, so that it matters; default schedule), for one tiny model in our own format (read by ΔConv Load)."""
    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights, save_weights

    sites = find_attention_sites(module)
    for variant, zero in (("random", False), ("zero", True)):
        weights = DeltaConvWeights.fresh(sites, seed=7, zero_output=zero)
        out[f"{name}_{variant}"] = save_weights(weights, os.path.join(folder, f"{name}_{variant}.safetensors"))
    mediators = DeltaConvWeights.fresh_mediators(sites, module)
    g = torch.Generator().manual_seed(8)
    for _, state in mediators.blocks.values():
        state["dwc.weight"] = torch.randn(state["dwc.weight"].shape, generator=g) * 0.1
    out[f"{name}_mediators"] = save_weights(mediators, os.path.join(folder, f"{name}_mediators.safetensors"))


def write_tiny_models(base) -> dict:
    """Writes models under `base/models/...`; returns {name: path} plus "base"."""
    base = str(base)
    unet_dir = os.path.join(base, "models", "unet")
    blocks_dir = os.path.join(base, "models", "deltaconv")
    out = {"base": base}
    builders = [("tiny_sd15", lambda: build_unet(SD15_TINY, 1)),
                ("tiny_sd15_inpaint", lambda: build_unet(SD15_TINY, 2, 9)),
                ("tiny_sdxl", lambda: build_unet(KOALA_TINY, 3))]
    if has_pixart():
        builders.append(("tiny_pixart", lambda: build_pixart(4)))
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

