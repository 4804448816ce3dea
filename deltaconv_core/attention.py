"""Drop-in replacements for a model's self-attention modules that run a ΔConvBlock instead.

Each wrapper keeps the original projections registered under their original names (so state-dict keys, LoRA,
SAG and PAG keep working) and an unregistered reference to the original attention, which it falls back to per
call whenever the input is not a plain image-token grid or ΔConv is switched off for the current sigma.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

import torch
from torch import nn

from .block import DeltaConvBlock

log = logging.getLogger("deltaconv")


def infer_grid(latent_hw, n_tokens: int):
    """(h, w) of a UNet level from the latent size and token count: the latent halved (rounding up) f times."""
    H, W = int(latent_hw[0]), int(latent_hw[1])
    h, w = H, W
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return (h, w) if h * w == n_tokens else None


class PatchRuntime:
    """State shared by all replaced sites of one patched model: the active sigma range and call counters."""

    def __init__(self, sigma_start: float = math.inf, sigma_end: float = 0.0):
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.counts: Counter = Counter()  # "delta" and "attention:<reason>" per call
        self.site_counts: Counter = Counter()  # ΔConv calls per site name
        self.teacher = False  # distillation: every site runs its original attention
        self.recording: dict | None = None  # distillation: site → (input, grid, attention output) of teacher calls
        self.stashed_options = None  # older ComfyUI: extra_options captured by an attn1_patch just before attn1
        self.current_sigmas = None  # DiTs: sigmas captured by a model wrapper around each step
        self._sigma_key, self._sigma_ok = None, True
        self._warned: set = set()

    @property
    def full_range(self) -> bool:
        return self.sigma_start == math.inf and self.sigma_end <= 0.0

    def sigma_active(self, sigmas) -> bool:
        if self.full_range or sigmas is None:
            return True
        if sigmas is not self._sigma_key:  # same tensor object for every site of one step: read it once
            s = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
            self._sigma_key, self._sigma_ok = sigmas, self.sigma_end <= s <= self.sigma_start
        return self._sigma_ok

    def ran_delta(self, site: str):
        self.counts["delta"] += 1
        self.site_counts[site] += 1

    def run_teacher(self, site: str, original, x, hw, **kwargs):
        """Original attention for distillation; records what stage A trains each block on."""
        self.counts["teacher"] += 1
        out = original(x, **kwargs)
        if self.recording is not None and not isinstance(hw, str):
            self.recording[site] = (x.detach(), hw, out.detach())
        return out

    def fallback(self, site: str, reason: str):
        self.counts[f"attention:{reason}"] += 1
        if reason != "sigma" and (site, reason) not in self._warned:
            self._warned.add((site, reason))
            log.warning("ΔConv: %s runs the original attention (%s); logged once per site", site, reason)


class DeltaConvSelfAttention(nn.Module):
    """Replaces a UNet `attn1` (CrossAttention): forward(x, context, value, mask, transformer_options)."""

    def __init__(self, original: nn.Module, block: DeltaConvBlock, runtime: PatchRuntime, site: str):
        super().__init__()
        for name in ("to_q", "to_k", "to_v", "to_out"):
            setattr(self, name, getattr(original, name))
        for name in ("heads", "dim_head", "attn_precision"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.delta = block
        self._original = (original,)  # a tuple keeps it out of the module tree (no duplicate parameters)
        self.runtime = runtime
        self.site = site

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def _plan(self, x, context, value, mask, options):
        """(h, w) when ΔConv can run on this call, else the reason it cannot."""
        if options is None:
            options = self.runtime.stashed_options or {}
        if not self.runtime.sigma_active(options.get("sigmas")):
            return "sigma"
        shape = options.get("activations_shape")
        if shape is not None:
            hw = (int(shape[2]), int(shape[3])) if shape[0] == x.shape[0] else None
        elif options.get("original_shape") is not None:
            latent = options["original_shape"]
            hw = infer_grid(latent[2:], x.shape[1]) if latent[0] == x.shape[0] else None
        else:
            return "grid unknown"
        if hw is None or hw[0] * hw[1] != x.shape[1]:
            return "tokens rearranged"  # ToMe, HyperTile, window attention
        if mask is not None or (context is not None and context is not x) or (value is not None and value is not x):
            return "context"  # keys/values from elsewhere (reference-only, hypernetworks)
        return hw

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        plan = self._plan(x, context, value, mask, transformer_options)
        kwargs = {"context": context, "value": value, "mask": mask}
        if transformer_options is not None:
            kwargs["transformer_options"] = transformer_options
        if self.runtime.teacher:
            return self.runtime.run_teacher(self.site, self.original, x, plan, **kwargs)
        if isinstance(plan, str):
            self.runtime.fallback(self.site, plan)
            return self.original(x, **kwargs)
        self.runtime.ran_delta(self.site)
        b, n, c = x.shape
        return self.delta(x.reshape(b, plan[0], plan[1], c)).reshape(b, n, c)


class DeltaConvDiTAttention(nn.Module):
    """Replaces a PixArt `blocks.i.attn`: forward(x, mask=None, HW=None, block_id=None); HW is the latent size."""

    def __init__(self, original: nn.Module, block: DeltaConvBlock, runtime: PatchRuntime, site: str, patch_size: int):
        super().__init__()
        for name in ("qkv", "proj", "q_norm", "k_norm"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        for name in ("num_heads", "dim", "sr_ratio"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.delta = block
        self._original = (original,)
        self.runtime = runtime
        self.site = site
        self.patch_size = patch_size

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, x, mask=None, HW=None, block_id=None):
        b, n, c = x.shape
        reason = None
        if HW is None:
            reason = "grid unknown"
        elif not self.runtime.sigma_active(self.runtime.current_sigmas):
            reason = "sigma"
        else:
            h, w = math.ceil(HW[0] / self.patch_size), math.ceil(HW[1] / self.patch_size)
            if h * w != n:
                reason = "tokens rearranged"
        kwargs = {"mask": mask, "HW": HW, "block_id": block_id}
        if self.runtime.teacher:
            return self.runtime.run_teacher(self.site, self.original, x, reason or (h, w), **kwargs)
        if reason is not None:
            self.runtime.fallback(self.site, reason)
            return self.original(x, **kwargs)
        self.runtime.ran_delta(self.site)
        return self.delta(x.reshape(b, h, w, c)).reshape(b, n, c)
