"""What a family adapter provides, and the site descriptions adapters return.

A family adapter holds everything ΔConv knows about one family of diffusion models: how ComfyUI lays the model out
(detection, the self-attention sites, their token grids, their projections), how the official ConvFusion releases
name its blocks, and its defaults (kernel sizes, gate). Nothing outside `families/` tests for a family: it asks the
family's adapter. Adapters never import ComfyUI; they recognise its modules by structure.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# Why a call's tokens are not a plain image grid: the wrappers' fallback reasons (per call, counted by reason).
GRID_UNKNOWN, TOKENS_REARRANGED = "grid unknown", "tokens rearranged"

# Family key → adapter. Filled by families/__init__.py, the one place adapters are listed.
FAMILIES: dict[str, FamilyAdapter] = {}


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
    family: str  # a key of FAMILIES, as weight files store it
    variant: str  # human description, e.g. "SDXL (70 sites)" or "PixArt-Σ"
    sites: tuple[AttentionSite, ...]
    patch_size: int | tuple[int, ...] = 1  # DiT token grid = latent / patch_size (per axis: Wan's (1, 2, 2))

    @property
    def adapter(self) -> FamilyAdapter:
        return FAMILIES[self.family]

    @property
    def default_gate(self) -> str:
        return self.adapter.gate

    def levels(self) -> list[int]:
        return sorted({s.level for s in self.sites})


class TeacherProjections(NamedTuple):
    """The projections of one self-attention module, as mediator attention copies them."""
    qkv: tuple[nn.Module, ...]  # the q, k and v linears, or one fused linear whose output is q|k|v
    out: nn.Module  # the output projection
    heads: int
    qk_norms: tuple[nn.Module, nn.Module] | None = None  # RMSNorms over the whole q and k (Wan), if it has them


class FamilyAdapter(ABC):
    """One model family. `find_sites` and the per-module methods assume `detect` accepted the model."""

    key: str  # what weight files store as their family ("sd1", "pixart", ...): never renamed, old files must load
    label: str  # for messages: "SD1.x", "PixArt-α/Σ"
    gate: str  # the ΔConv gate of its blocks (BlockConfig.gate): "scaled" or "sigmoid"
    wrapper: str  # the class in deltaconv_core/attention.py that replaces its sites; its grid is token_grid
    attention: str  # its self-attention module for messages: "a PixArt attention (qkv/proj)"
    tiny_model: str  # the tiny random model of scripts/devkit/tiny_models.py (TINY_MODELS) its tests run on
    grid_dims: int = 2  # its token grids: 2, (h, w) images; 3, (t, h, w) video (only students that take those)
    time_kernel: int = 0  # taps over time of its fresh ΔConv blocks (BlockConfig.time_kernel): video families only
    # Appended to the report's "distilled from a different checkpoint" note: what commonly causes it in this family.
    mismatch_hint: str = ""

    @abstractmethod
    def detect(self, diffusion_model: nn.Module) -> bool:
        """Whether a ComfyUI diffusion model is of this family, by its structure. At most one adapter says yes."""

    @abstractmethod
    def find_sites(self, diffusion_model: nn.Module) -> ModelSites:
        """Every self-attention site, named as the official releases name its block, with its resolution level
        and default kernel; raises UnsupportedModelError when the model has none ΔConv can replace."""

    @abstractmethod
    def kernel_size(self, direction: str, level: int) -> int:
        """The default kernel size at a site: the official releases' choice (≈ 0.6 × the measured ERF)."""

    @abstractmethod
    def token_grid(self, model_sites: ModelSites, x_shape: torch.Size, call: dict) -> tuple[int, ...] | str:
        """The (h, w) grid (video: (t, h, w)) that the tokens of one self-attention call ([B, N, C], `x_shape`) lie
        on, from what the call passes besides them (`call`, its keyword arguments, plus `latent_shape`: the step's
        latent shape when a model wrapper saw it); or why there is none: GRID_UNKNOWN when nothing says,
        TOKENS_REARRANGED when the tokens are not that grid (ToMe, HyperTile, window attention, extra tokens)."""

    @abstractmethod
    def is_attention(self, module: nn.Module) -> bool:
        """Whether `module` is this family's self-attention (has its projections); anything else at a site was put
        there by another node."""

    @abstractmethod
    def projection_weight(self, attention: nn.Module) -> torch.Tensor:
        """The q (or fused qkv) weight: its dtype is the students', its values fingerprint the base model."""

    @abstractmethod
    def teacher_projections(self, attention: nn.Module) -> TeacherProjections:
        """The projections mediator attention starts from; ValueError, saying why, when this attention computes
        something they cannot reproduce (e.g. a q/k LayerNorm; an RMSNorm over the whole q and k they keep)."""

    @abstractmethod
    def queries_keys(self, attention: nn.Module, x: torch.Tensor, call: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(queries, keys, heads) that `attention` computes from tokens x [N, C] in a call with these other
        arguments (attention.Recorded.call: e.g. RoPE frequencies): what its attention maps are of."""

    @abstractmethod
    def feature_tap_path(self, site_path: str) -> str:
        """The module whose forward input is the residual stream right after a site's self-attention (+ residual):
        distillation's stage B matches the teacher's there."""

    @abstractmethod
    def checkpoint_blocks(self, diffusion_model: nn.Module) -> list[nn.Module]:
        """The model's top-level blocks, which gradient checkpointing recomputes in backward."""

    @abstractmethod
    def claims_official(self, block_names: list[str]) -> bool:
        """Whether an official ConvFusion file (no metadata) with these block names was released for this family."""


def describe_unknown(model: nn.Module, why: str) -> str:
    """The error for a model ΔConv cannot patch: what it found instead, and what it supports."""
    def kind(m):
        return type(m).__name__

    children = ", ".join(f"{n} ({kind(m)})" for n, m in list(model.named_children())[:12]) or "none"
    attn_like = sorted({kind(m) for _, m in model.named_modules() if "attention" in kind(m).lower()})
    supported = ", ".join(a.label for a in FAMILIES.values())
    return (f"ΔConv cannot patch this model ({kind(model)}): {why}. Top-level modules: {children}. "
            f"Attention-like module types found: {', '.join(attn_like) or 'none'}. Supported: {supported}, whose "
            "self-attention is plain image (or video) self-attention. Joint text-image attention (SD3, Flux, ...) "
            "cannot be replaced by a convolution.")
