"""The model families ΔConv can patch, one adapter each (base.py says what an adapter provides), and the functions
the rest of the pack asks them through. Works on ComfyUI's diffusion-model modules without importing ComfyUI.
"""
from __future__ import annotations

from torch import nn

from ..quoting import quoted
from .base import (
    FAMILIES,
    GRID_UNKNOWN,
    TOKENS_REARRANGED,
    AttentionSite,
    FamilyAdapter,
    ModelSites,
    TeacherProjections,
    UnsupportedModelError,
    describe_unknown,
)
from .pixart import PIXART
from .unet import OTHER_UNET, SD1, SD2, SDXL
from .wan import WAN

__all__ = ["FAMILIES", "GRID_UNKNOWN", "LEVEL_CHOICES", "TOKENS_REARRANGED", "AttentionSite", "FamilyAdapter",
           "ModelSites", "TeacherProjections", "UnsupportedModelError", "family_label", "family_of",
           "find_attention_sites", "official_family", "select_levels", "teacher_projections"]

# The one place adapters are listed. Their keys are what weight files store: never rename one (old files must load).
FAMILIES.update((adapter.key, adapter) for adapter in (SD1, SD2, SDXL, PIXART, WAN, OTHER_UNET))


def family_of(diffusion_model: nn.Module) -> FamilyAdapter:
    """The adapter of a ComfyUI diffusion model's family, recognised by structure."""
    for adapter in FAMILIES.values():
        if adapter.detect(diffusion_model):
            return adapter
    raise UnsupportedModelError(describe_unknown(diffusion_model, "no known self-attention layout"))


def find_attention_sites(diffusion_model: nn.Module) -> ModelSites:
    """Every self-attention site of a ComfyUI diffusion model, recognised by structure."""
    return family_of(diffusion_model).find_sites(diffusion_model)


def family_label(key: str) -> str:
    """A family key for messages ("sd1" → "SD1.x"); an unknown key as it is."""
    return FAMILIES[key].label if key in FAMILIES else key


def official_family(block_names: list[str]) -> FamilyAdapter | None:
    """The family an official ConvFusion file (no metadata) with these block names was released for."""
    return next((a for a in FAMILIES.values() if a.claims_official(block_names)), None)


def teacher_projections(attention: nn.Module, family: str | None = None) -> TeacherProjections:
    """The projections of a self-attention module of `family`, or of whichever family's it is when None."""
    if family is not None:
        return FAMILIES[family].teacher_projections(attention)
    for adapter in FAMILIES.values():
        if adapter.is_attention(attention):
            return adapter.teacher_projections(attention)
    known = ", ".join(dict.fromkeys(a.attention for a in FAMILIES.values()))  # the UNets share one description
    raise ValueError(f"{type(attention).__name__} is none of the self-attention modules ΔConv knows: {known}")


LEVEL_CHOICES = ("all", "finest", "finest_two")


def select_levels(model_sites: ModelSites, choice: str) -> set[int]:
    """Resolution levels to replace: all, or only the finest (highest-resolution) one or two with attention."""
    levels = model_sites.levels()
    if choice == "all":
        return set(levels)
    if choice == "finest":
        return set(levels[:1])
    if choice == "finest_two":
        return set(levels[:2])
    raise ValueError(f"levels must be one of {LEVEL_CHOICES}, got {quoted(choice)}")
