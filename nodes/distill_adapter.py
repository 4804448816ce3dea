"""ComfyUI side of distillation: the shared model as a denoiser callable, its sigmas, taps and conditioning."""
import math

import comfy.model_management
import comfy.utils
import torch

from ..deltaconv_core.distill import DistillError
from ..deltaconv_core.families import feature_tap_path
from .patching import PREFIX, _model_sampling


def latent_channels(model) -> int:
    return getattr(model.model.latent_format, "latent_channels", 4)


def _model_conds(base, entry, like: torch.Tensor) -> dict:
    """One CONDITIONING entry → the keyword arguments apply_model takes (c_crossattn, y, c_size, ...)."""
    tensor, extra = entry
    params = {**extra, "cross_attn": tensor, "device": like.device, "noise": like, "latent_image": like * 0,
              "width": like.shape[3] * 8, "height": like.shape[2] * 8}
    return {k: (v.cond.to(like.device) if torch.is_tensor(v.cond) else v.cond)
            for k, v in base.extra_conds(**params).items()}


def _stack(values: list):
    """Stack per-sample conds; token sequences of different lengths are repeated to a common length (as ComfyUI)."""
    if not torch.is_tensor(values[0]):
        return values[0]
    if values[0].ndim == 3 and len({v.shape[1] for v in values}) > 1:
        n = math.lcm(*(v.shape[1] for v in values))
        values = [v.repeat(1, n // v.shape[1], 1) for v in values]
    return torch.cat(values)


class ComfyDenoiser:
    """denoise(x_t, sigma, negative_mask, index) -> x̂_0 through ComfyUI's apply_model (conds handled per model)."""

    def __init__(self, patcher, positive, negative, example: torch.Tensor):
        if not positive or not torch.is_tensor(positive[0][0]) or positive[0][0].numel() == 0:
            raise DistillError("the positive CONDITIONING is empty: connect a CLIP Text Encode (or similar) output")
        self.base = patcher.model
        self.options = patcher.model_options
        like = example[:1]
        self.positive = [_model_conds(self.base, e, like) for e in positive]
        self.negative = _model_conds(self.base, negative[0], like) if negative else None

    def __call__(self, x_t, sigma, negative_mask, index=None):
        rows = []
        for i in range(x_t.shape[0]):
            use_negative = self.negative is not None and bool(negative_mask[i])
            j = 0 if index is None else int(index[i]) % len(self.positive)
            rows.append(self.negative if use_negative else self.positive[j])
        conds = {k: _stack([r[k] for r in rows]) for k in rows[0]}
        options = {**self.options.get("transformer_options", {})}
        return self.base.apply_model(x_t, sigma, transformer_options=options, **conds)


def sigma_table(patcher) -> torch.Tensor:
    return _model_sampling(patcher).sigmas


def feature_taps(patcher, sites) -> dict:
    return {s.name: comfy.utils.get_attr(patcher.model, PREFIX + feature_tap_path(s.path)) for s in sites}


def trainable_blocks(patcher, sites) -> dict:
    blocks = {}
    for s in sites:
        wrapper = patcher.object_patches.get(PREFIX + s.path)
        if wrapper is not None:
            blocks[s.name] = wrapper.delta
    return blocks


def make_backprop_safe(module: torch.nn.Module):
    """Frozen weights loaded under inference mode cannot be saved for backward: give them normal storage."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference():
                setattr(sub, name, torch.nn.Parameter(p.clone(), requires_grad=False))


def load_for_training(patcher):
    kwargs = {"force_full_load": True} if "force_full_load" in \
        comfy.model_management.load_models_gpu.__code__.co_varnames else {}
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20 if kwargs else 0, **kwargs)
