"""PixArt-α/Σ (ComfyUI's PixArtMS): a list of DiT blocks, each with a plain image self-attention `attn` (fused qkv,
proj) and a separate cross-attention; the tokens are the latent cut into patch_size² patches.
"""
from __future__ import annotations

import math

from torch import nn

from .base import GRID_UNKNOWN, TOKENS_REARRANGED, AttentionSite, FamilyAdapter, ModelSites, TeacherProjections

KERNEL = 13  # every released PixArt block uses 13
OFFICIAL_PREFIX = "transformer_blocks."  # official block names: diffusers' transformer_blocks.<i>


class PixArtFamily(FamilyAdapter):
    key = "pixart"
    label = "PixArt-α/Σ"
    gate = "sigmoid"
    wrapper = "StudentDiTAttention"
    attention = "a PixArt attention (qkv/proj)"
    tiny_model = "tiny_pixart"

    def _is_block(self, block: nn.Module) -> bool:
        attn = getattr(block, "attn", None)
        return (attn is not None and self.is_attention(attn) and hasattr(block, "cross_attn")
                and hasattr(block, "scale_shift_table"))

    def detect(self, diffusion_model):
        blocks = getattr(diffusion_model, "blocks", None)
        return isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(self._is_block(b) for b in blocks)

    def find_sites(self, diffusion_model):
        sites = tuple(AttentionSite(f"blocks.{i}.attn", f"{OFFICIAL_PREFIX}{i}", b.attn.qkv.in_features, "dit", 0,
                                    self.kernel_size("dit", 0))
                      for i, b in enumerate(diffusion_model.blocks))
        patch = getattr(getattr(diffusion_model, "x_embedder", None), "patch_size", 2)
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        variant = "PixArt-α" if getattr(diffusion_model, "ar_embedder", None) is not None else "PixArt-Σ"
        return ModelSites(self.key, f"{variant} ({len(sites)} self-attention sites)", sites, patch_size=patch)

    def kernel_size(self, direction, level):
        return KERNEL

    def token_grid(self, model_sites, x_shape, call):
        """The latent size HW the block passes, in patches (rounded up, as the patch embedding pads)."""
        hw = call.get("HW")
        if hw is None:
            return GRID_UNKNOWN
        h, w = math.ceil(hw[0] / model_sites.patch_size), math.ceil(hw[1] / model_sites.patch_size)
        return (h, w) if h * w == x_shape[1] else TOKENS_REARRANGED

    def is_attention(self, module):
        return hasattr(module, "qkv") and hasattr(module, "proj")

    def projection_weight(self, attention):
        return attention.qkv.weight

    def teacher_projections(self, attention):
        if not self.is_attention(attention):
            raise ValueError(f"{type(attention).__name__} is not {self.attention}")
        for norm in ("q_norm", "k_norm"):  # a q/k LayerNorm would be a different attention; none in PixArt-α/Σ
            if not isinstance(getattr(attention, norm, nn.Identity()), nn.Identity):
                raise ValueError(f"teacher attention has a {norm}; mediator attention has no q/k normalisation")
        return TeacherProjections((attention.qkv,), attention.proj, attention.num_heads)

    def queries_keys(self, attention, x, call):
        """PixArt's positions are in its tokens already (absolute embeddings added before the blocks)."""
        q, k, _ = attention.qkv(x).chunk(3, dim=-1)
        return q, k, attention.num_heads

    def feature_tap_path(self, site_path):
        """The block's cross_attn, which reads that stream first."""
        return f"{site_path.rsplit('.', 1)[0]}.cross_attn"

    def checkpoint_blocks(self, diffusion_model):
        return list(diffusion_model.blocks)

    def claims_official(self, block_names):
        return bool(block_names) and all(n.startswith(OFFICIAL_PREFIX) for n in block_names)


PIXART = PixArtFamily()
