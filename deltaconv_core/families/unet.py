"""The UNet families: SD1.x, SD2.x, SDXL (with its smaller shapes SSD-1B, Vega, KOALA) and any other UNet in
ComfyUI's openaimodel layout. They share one structure, so one class: the families differ in the width of their
cross-attention context (which tells them apart), kernel tables, labels and official releases.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import (
    GRID_UNKNOWN,
    TOKENS_REARRANGED,
    AttentionSite,
    FamilyAdapter,
    ModelSites,
    TeacherProjections,
    UnsupportedModelError,
    describe_unknown,
)

# Kernel sizes of the released blocks (the authors' model classes), keyed by (direction, resolution level); level 0
# is the finest grid. Chosen there as ≈0.6 × the measured effective receptive field, rounded to odd; SD2.x and
# unknown UNets reuse the SD1.x table.
SD1_KERNELS = {("down", 0): 7, ("down", 1): 9, ("down", 2): 5, ("mid", None): 3,
               ("up", 2): 5, ("up", 1): 9, ("up", 0): 11}
SDXL_KERNELS = {("down", 1): 9, ("down", 2): 7, ("mid", None): 9, ("up", 2): 9, ("up", 1): 13}
FALLBACK_KERNEL = 7

# Context (cross-attention) width tells the UNet families apart; any other width is the "unet" family.
FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
OTHER = "unet"
# Official block names: diffusers UNet paths. SD1.x has attention at its finest level, SDXL has none there.
UNET_NAMES = ("down_blocks.", "mid_block.", "up_blocks.")
FINEST_LEVEL = "down_blocks.0.attentions."


def infer_grid(latent_hw, n_tokens: int):
    """(h, w) of a UNet level from the latent size and token count: the latent halved (rounding up) f times."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return (h, w) if h * w == n_tokens else None


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _self_attention_blocks(container: nn.Module):
    """(depth index, transformer block) pairs of a SpatialTransformer-like module that do plain self-attention."""
    for i, tb in enumerate(getattr(container, "transformer_blocks", [])):
        attn1 = getattr(tb, "attn1", None)
        if attn1 is None or getattr(tb, "disable_self_attn", False):
            continue
        if attn1.to_k.in_features != attn1.to_q.in_features:  # attends to something other than itself
            continue
        yield i, tb


def _unet_sites(model: nn.Module) -> list[tuple[str, str, nn.Module, str, int]]:
    """(path, official name, transformer block, direction, level) for every attn1, in down → mid → up order."""
    found = []
    level, j = 0, 0
    for bid, block in enumerate(model.input_blocks):
        if bid == 0:
            continue
        if any(_kind(m) == "Downsample" for m in block):
            level, j = level + 1, 0
            continue
        for idx, sub in enumerate(block):
            for i, tb in _self_attention_blocks(sub):
                found.append((f"input_blocks.{bid}.{idx}.transformer_blocks.{i}.attn1",
                              f"down_blocks.{level}.attentions.{j}.transformer_blocks.{i}", tb, "down", level))
        j += 1
    deepest = level
    for idx, sub in enumerate(model.middle_block or ()):  # KOALA-style UNets have no middle block
        for i, tb in _self_attention_blocks(sub):
            found.append((f"middle_block.{idx}.transformer_blocks.{i}.attn1",
                          f"mid_block.attentions.0.transformer_blocks.{i}", tb, "mid", deepest))
    up, j = 0, 0
    for bid, block in enumerate(model.output_blocks):
        for idx, sub in enumerate(block):
            for i, tb in _self_attention_blocks(sub):
                found.append((f"output_blocks.{bid}.{idx}.transformer_blocks.{i}.attn1",
                              f"up_blocks.{up}.attentions.{j}.transformer_blocks.{i}", tb, "up", deepest - up))
        j += 1
        if any(_kind(m) == "Upsample" for m in block):
            up, j = up + 1, 0
    return found


def _family_key(model: nn.Module) -> str:
    """The UNet family of a model, by the context width of its first self-attention block's cross-attention."""
    found = _unet_sites(model)
    first = found[0][2] if found else None
    context = first.attn2.to_k.in_features if first is not None and hasattr(first, "attn2") else None
    return FAMILY_BY_CONTEXT.get(context, OTHER)


class UNetFamily(FamilyAdapter):
    gate = "scaled"
    wrapper = "StudentSelfAttention"
    attention = "an SD/SDXL attn1 (to_q/to_k/to_v/to_out)"

    def __init__(self, key: str, label: str, kernels: dict, tiny_model: str, official_finest_level: bool | None):
        """official_finest_level: whether the official release has blocks at the finest level (None: no release)."""
        self.key, self.label, self.kernels, self.tiny_model = key, label, kernels, tiny_model
        self.official_finest_level = official_finest_level

    def detect(self, diffusion_model):
        unet = all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks"))
        return unet and _family_key(diffusion_model) == self.key

    def find_sites(self, diffusion_model):
        raw = _unet_sites(diffusion_model)
        if not raw:
            raise UnsupportedModelError(describe_unknown(diffusion_model,
                                                         "a UNet without self-attention transformer blocks"))
        sites = tuple(AttentionSite(path, name, tb.attn1.to_q.in_features, d, lvl, self.kernel_size(d, lvl))
                      for path, name, tb, d, lvl in raw)
        return ModelSites(self.key, f"{self.label} UNet ({len(sites)} self-attention sites)", sites)

    def kernel_size(self, direction, level):
        return self.kernels.get((direction, None if direction == "mid" else level), FALLBACK_KERNEL)

    def token_grid(self, model_sites, x_shape, call):
        """From the call's transformer_options (on older ComfyUI, which passes none, those an attn1_patch stashed):
        activations_shape [B, C, h, w] of the block, else the latent's original_shape, halved per level."""
        batch, tokens = x_shape[0], x_shape[1]
        options = call.get("transformer_options") or {}
        shape, latent = options.get("activations_shape"), options.get("original_shape")
        if shape is not None:
            hw = (int(shape[2]), int(shape[3])) if shape[0] == batch else None
        elif latent is not None:
            hw = infer_grid(latent[2:], tokens) if latent[0] == batch else None
        else:
            return GRID_UNKNOWN
        return hw if hw is not None and hw[0] * hw[1] == tokens else TOKENS_REARRANGED

    def is_attention(self, module):
        return all(hasattr(module, n) for n in ("to_q", "to_k", "to_v", "to_out"))

    def projection_weight(self, attention):
        return attention.to_q.weight

    def teacher_projections(self, attention):
        if not self.is_attention(attention):
            raise ValueError(f"{_kind(attention)} is not {self.attention}")
        return TeacherProjections((attention.to_q, attention.to_k, attention.to_v), attention.to_out[0],
                                  attention.heads)

    def queries_keys(self, attention, x: torch.Tensor, call):
        return attention.to_q(x), attention.to_k(x), attention.heads

    def feature_tap_path(self, site_path):
        """The transformer block's norm2: it normalises that stream before cross-attention."""
        return f"{site_path.rsplit('.', 1)[0]}.norm2"

    def checkpoint_blocks(self, diffusion_model):
        middle = [diffusion_model.middle_block] if diffusion_model.middle_block is not None else []
        return [*diffusion_model.input_blocks, *middle, *diffusion_model.output_blocks]

    def claims_official(self, block_names):
        if self.official_finest_level is None:
            return False
        unet = any(n.startswith(UNET_NAMES) for n in block_names)
        return unet and any(n.startswith(FINEST_LEVEL) for n in block_names) == self.official_finest_level


SD1 = UNetFamily("sd1", "SD1.x", SD1_KERNELS, "tiny_sd15", official_finest_level=True)
SD2 = UNetFamily("sd2", "SD2.x", SD1_KERNELS, "tiny_sd2", official_finest_level=None)  # SD1.x layout, no release
SDXL = UNetFamily("sdxl", "SDXL", SDXL_KERNELS, "tiny_sdxl", official_finest_level=False)
OTHER_UNET = UNetFamily(OTHER, "UNet (other)", SD1_KERNELS, "tiny_unet", official_finest_level=None)
