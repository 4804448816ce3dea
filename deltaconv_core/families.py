"""Find every self-attention site of a loaded diffusion model by its structure.

Works on the `diffusion_model` module of ComfyUI's UNet (SD1.x, SD2.x, SDXL and its smaller variants) and PixArt
(α/Σ) classes without importing ComfyUI. Each site carries its ComfyUI module path, the official (diffusers)
block name used in ConvFusion checkpoints, its channel count, resolution level and official kernel size.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .quoting import quoted

# Kernel sizes of the released blocks (the authors' model classes), keyed by (direction, resolution level); level 0
# is the finest grid. Chosen there as ≈0.6 × the measured effective receptive field, rounded to odd; SD2.x and
# unknown UNets reuse the SD1.x table.
SD1_KERNELS = {("down", 0): 7, ("down", 1): 9, ("down", 2): 5, ("mid", None): 3,
               ("up", 2): 5, ("up", 1): 9, ("up", 0): 11}
SDXL_KERNELS = {("down", 1): 9, ("down", 2): 7, ("mid", None): 9, ("up", 2): 9, ("up", 1): 13}
PIXART_KERNEL = 13
FALLBACK_KERNEL = 7

# Context (cross-attention) width tells the UNet families apart.
UNET_FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "pixart": "PixArt-α/Σ", "unet": "UNet (other)"}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class AttentionSite:
    path: str  # module path inside the diffusion model, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    name: str  # official block name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0"
    channels: int
    direction: str  # "down" | "mid" | "up" | "dit"
    level: int  # resolution level: 0 = finest grid of the model
    kernel_size: int  # official default for this place

    @property
    def label(self) -> str:
        return f"{self.name} ({self.direction}, level {self.level}, C={self.channels})"


@dataclass(frozen=True)
class ModelSites:
    family: str  # "sd1" | "sd2" | "sdxl" | "unet" | "pixart"
    variant: str  # human description, e.g. "SDXL (70 sites)" or "PixArt-Σ"
    sites: tuple[AttentionSite, ...]
    patch_size: int = 1  # DiT token grid = latent / patch_size

    @property
    def default_gate(self) -> str:
        return "sigmoid" if self.family == "pixart" else "scaled"

    def levels(self) -> list[int]:
        return sorted({s.level for s in self.sites})


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _unet_kernel(family: str, direction: str, level: int) -> int:
    table = SDXL_KERNELS if family == "sdxl" else SD1_KERNELS
    return table.get((direction, None if direction == "mid" else level), FALLBACK_KERNEL)


def _self_attention_blocks(container: nn.Module):
    """(depth index, transformer block) pairs of a SpatialTransformer-like module that do plain self-attention."""
    for i, tb in enumerate(getattr(container, "transformer_blocks", [])):
        attn1 = getattr(tb, "attn1", None)
        if attn1 is None or getattr(tb, "disable_self_attn", False):
            continue
        if attn1.to_k.in_features != attn1.to_q.in_features:  # attends to something other than itself
            continue
        yield i, tb


def _unet_sites(model: nn.Module) -> list[tuple[str, str, int, str, int]]:
    """(path, official name, channels, direction, level) for every UNet attn1, in down → mid → up order."""
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
                              f"down_blocks.{level}.attentions.{j}.transformer_blocks.{i}",
                              tb.attn1.to_q.in_features, "down", level))
        j += 1
    deepest = level
    for idx, sub in enumerate(model.middle_block or ()):  # KOALA-style UNets have no middle block
        for i, tb in _self_attention_blocks(sub):
            found.append((f"middle_block.{idx}.transformer_blocks.{i}.attn1",
                          f"mid_block.attentions.0.transformer_blocks.{i}",
                          tb.attn1.to_q.in_features, "mid", deepest))
    up, j = 0, 0
    for bid, block in enumerate(model.output_blocks):
        for idx, sub in enumerate(block):
            for i, tb in _self_attention_blocks(sub):
                found.append((f"output_blocks.{bid}.{idx}.transformer_blocks.{i}.attn1",
                              f"up_blocks.{up}.attentions.{j}.transformer_blocks.{i}",
                              tb.attn1.to_q.in_features, "up", deepest - up))
        j += 1
        if any(_kind(m) == "Upsample" for m in block):
            up, j = up + 1, 0
    return found


def _find_unet(model: nn.Module) -> ModelSites:
    raw = _unet_sites(model)
    if not raw:
        raise UnsupportedModelError(_describe_unknown(model, "a UNet without self-attention transformer blocks"))
    first = model.get_submodule(raw[0][0].rsplit(".", 1)[0])
    context = first.attn2.to_k.in_features if hasattr(first, "attn2") else None
    family = UNET_FAMILY_BY_CONTEXT.get(context, "unet")
    sites = tuple(AttentionSite(path, name, c, d, lvl, _unet_kernel(family, d, lvl)) for path, name, c, d, lvl in raw)
    return ModelSites(family, f"{FAMILY_LABELS[family]} UNet ({len(sites)} self-attention sites)", sites)


def _is_pixart_block(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (attn is not None and hasattr(attn, "qkv") and hasattr(attn, "proj")
            and hasattr(block, "cross_attn") and hasattr(block, "scale_shift_table"))


def _find_pixart(model: nn.Module) -> ModelSites:
    sites = tuple(
        AttentionSite(f"blocks.{i}.attn", f"transformer_blocks.{i}", b.attn.qkv.in_features, "dit", 0, PIXART_KERNEL)
        for i, b in enumerate(model.blocks)
    )
    patch = getattr(getattr(model, "x_embedder", None), "patch_size", 2)
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    variant = "PixArt-α" if getattr(model, "ar_embedder", None) is not None else "PixArt-Σ"
    return ModelSites("pixart", f"{variant} ({len(sites)} self-attention sites)", sites, patch_size=patch)


def _describe_unknown(model: nn.Module, why: str) -> str:
    children = ", ".join(f"{n} ({_kind(m)})" for n, m in list(model.named_children())[:12]) or "none"
    attn_like = sorted({_kind(m) for _, m in model.named_modules() if "attention" in _kind(m).lower()})
    return (f"ΔConv cannot patch this model ({_kind(model)}): {why}. Top-level modules: {children}. "
            f"Attention-like module types found: {', '.join(attn_like) or 'none'}. Supported: SD1.x, SD2.x, "
            "SDXL (and Vega/KOALA/SSD-1B shapes) UNets and PixArt-α/Σ, whose self-attention is plain image "
            "self-attention. Joint text-image attention (SD3, Flux, ...) cannot be replaced by a convolution.")


def find_attention_sites(diffusion_model: nn.Module) -> ModelSites:
    """Every self-attention site of a ComfyUI diffusion model, recognised by structure."""
    if all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        return _find_unet(diffusion_model)
    blocks = getattr(diffusion_model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and all(_is_pixart_block(b) for b in blocks):
        return _find_pixart(diffusion_model)
    raise UnsupportedModelError(_describe_unknown(diffusion_model, "no known self-attention layout"))


LEVEL_CHOICES = ("all", "finest", "finest two")


def select_levels(model_sites: ModelSites, choice: str) -> set[int]:
    """Resolution levels to replace: all, or only the finest (highest-resolution) one or two with attention."""
    levels = model_sites.levels()
    if choice == "all":
        return set(levels)
    if choice == "finest":
        return set(levels[:1])
    if choice == "finest two":
        return set(levels[:2])
    raise ValueError(f"levels must be one of {LEVEL_CHOICES}, got {quoted(choice)}")


def feature_tap_path(site_path: str) -> str:
    """Module whose forward input is the residual stream right after a site's self-attention (+ residual).

    UNet: the block's norm2 (it normalises that stream before cross-attention); PixArt: the block's cross_attn.
    """
    parent, leaf = site_path.rsplit(".", 1)
    return f"{parent}.norm2" if leaf == "attn1" else f"{parent}.cross_attn"
