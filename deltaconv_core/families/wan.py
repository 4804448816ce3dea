"""Wan 2.x (ComfyUI's WanModel and its variants): a list of DiT blocks, each with a video self-attention `self_attn`
(q/k/v/o linears, RMSNorms over the whole q and k, 3-D RoPE) and a separate cross-attention; the tokens are the
latent video cut into (1, 2, 2) patches by a Conv3d, on a frames × h × w grid.

The self-attention call passes only (x, freqs, transformer_options): the grid comes from the step's latent shape,
which the patch's model wrapper reads once per step (PatchRuntime.begin_step), divided by the patch size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import GRID_UNKNOWN, TOKENS_REARRANGED, AttentionSite, FamilyAdapter, ModelSites, TeacherProjections

# No ConvFusion release for Wan and no real weights measured here: the UNets' fallback kernel, read by ΔConv blocks
# only (mediator attention's DWC is 3×3 whatever the site's kernel). ΔConv Attention Locality measures a user's model.
KERNEL = 7
# ΔConv's taps over time, in latent frames: one frame either side. A latent frame stands for 4 video frames (Wan's
# VAE), so this already spans 12 frames; the clip-wide pooled branch carries what lies further (mediators: 3 too).
TIME_KERNEL = 3
NAME = "blocks.{}"  # our block names (no official release to follow): the DiT block's own path


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's rotary embedding as ComfyUI applies it: x [N, C] (one clip's q or k, heads × d channels); freqs
    [1, N, 1, d/2, 2, 2], a 2×2 rotation per token and channel pair. In float32 or wider, like the model."""
    n, c = x.shape
    rot = freqs[0]  # [N, 1, d/2, 2, 2]
    pairs = x.to(rot.dtype).reshape(n, heads, -1, 1, 2)
    return (rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]).reshape(n, c).to(x.dtype)


def _is_rms_norm(module: nn.Module, dim: int) -> bool:
    weight = getattr(module, "weight", None)
    return (any(c.__name__ == "RMSNorm" for c in type(module).__mro__) and weight is not None
            and tuple(weight.shape) == (dim,) and isinstance(getattr(module, "eps", None), float))


class WanFamily(FamilyAdapter):
    key = "wan"
    label = "Wan 2.x"
    gate = "sigmoid"  # a DiT like PixArt (no released ΔConv blocks to follow)
    wrapper = "StudentWanAttention"
    attention = "a Wan self_attn (q/k/v/o, norm_q/norm_k)"
    tiny_model = "tiny_wan"
    grid_dims = 3
    time_kernel = TIME_KERNEL
    # Wan 2.2 A14B's two experts share one architecture: only the fingerprints tell their files apart.
    mismatch_hint = (" (Wan 2.2 A14B: the high-noise and low-noise experts are two checkpoints, each with its own "
                     "ΔConv file: check that each ΔConv Patch gets the file of the expert it patches)")

    def _is_block(self, block: nn.Module) -> bool:
        attn = getattr(block, "self_attn", None)
        return attn is not None and self.is_attention(attn) and hasattr(block, "cross_attn")

    def detect(self, diffusion_model):
        blocks = getattr(diffusion_model, "blocks", None)
        return (isinstance(getattr(diffusion_model, "patch_embedding", None), nn.Conv3d)
                and isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(self._is_block(b) for b in blocks))

    def find_sites(self, diffusion_model):
        sites = tuple(AttentionSite(f"blocks.{i}.self_attn", NAME.format(i), b.self_attn.q.in_features, "dit", 0,
                                    self.kernel_size("dit", 0))
                      for i, b in enumerate(diffusion_model.blocks))
        kind = " ".join(filter(None, ("Wan 2.x", str(getattr(diffusion_model, "model_type", "")).upper())))
        variant = f"{kind} ({len(sites)} self-attention sites)"
        return ModelSites(self.key, variant, sites, patch_size=tuple(diffusion_model.patch_embedding.kernel_size))

    def kernel_size(self, direction, level):
        return KERNEL

    def token_grid(self, model_sites, x_shape, call):
        """The step's latent [B, C, T, H, W] in patches (rounded up, as the model pads to the patch size); tokens
        beyond that grid (a reference latent or frames concatenated in time, S2V's motion tokens) are rearranged."""
        latent = call.get("latent_shape")
        if latent is None or len(latent) != 5:
            return GRID_UNKNOWN
        grid = tuple(math.ceil(n / p) for n, p in zip(latent[2:], model_sites.patch_size))
        return grid if math.prod(grid) == x_shape[1] else TOKENS_REARRANGED

    def is_attention(self, module):
        return all(hasattr(module, n) for n in ("q", "k", "v", "o", "norm_q", "norm_k"))

    def projection_weight(self, attention):
        return attention.q.weight

    def teacher_projections(self, attention):
        """q/k/v/o and the q/k RMSNorms (kept by mediator attention); RoPE is the model's, applied per call."""
        if not self.is_attention(attention):
            raise ValueError(f"{type(attention).__name__} is not {self.attention}")
        norms = (attention.norm_q, attention.norm_k)
        if all(isinstance(n, nn.Identity) for n in norms):  # qk_norm=False
            norms = None
        elif not all(_is_rms_norm(n, attention.q.out_features) for n in norms):
            raise ValueError(f"teacher attention normalises q/k with {type(norms[0]).__name__}; mediator attention "
                             "keeps only an RMSNorm over the whole q and k")
        return TeacherProjections((attention.q, attention.k, attention.v), attention.o, attention.num_heads, norms)

    def queries_keys(self, attention, x, call):
        """Normalised and rotated by the call's RoPE (its `freqs`, one rotation per token and frequency pair), as
        the attention computes them: without the rotation the maps would not know where a token is."""
        freqs = call.get("freqs")
        if freqs is None:
            raise ValueError("a Wan self-attention call without its RoPE `freqs`: its attention maps are unknown")
        heads = attention.num_heads
        q, k = attention.norm_q(attention.q(x)), attention.norm_k(attention.k(x))
        return apply_rope(q, freqs, heads), apply_rope(k, freqs, heads), heads

    def feature_tap_path(self, site_path):
        """The block's norm3 (before its cross-attention; an Identity without cross_attn_norm), which reads that
        stream first."""
        return f"{site_path.rsplit('.', 1)[0]}.norm3"

    def checkpoint_blocks(self, diffusion_model):
        return list(diffusion_model.blocks)

    def claims_official(self, block_names):
        return False  # no ConvFusion release for Wan


WAN = WanFamily()
