"""A ComfyUI model as a denoiser callable (x_t, σ → x̂_0) with its conditioning prepared per model type, and its
training sigmas: what distillation and the locality analysis run the model through."""
import math

import torch

from ..deltaconv_core.distill import DistillError
from . import compat


def _model_conds(base, entry, like: torch.Tensor) -> dict:
    """One CONDITIONING entry → the keyword arguments apply_model takes (c_crossattn, y, c_size, ...)."""
    tensor, extra = entry
    params = {**extra, "cross_attn": tensor, "device": like.device, "noise": like, "latent_image": like * 0,
              "width": like.shape[-1] * 8, "height": like.shape[-2] * 8}
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
        self.options = compat.transformer_options(patcher)  # with the wrappers that set each step's state
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
        return self.base.apply_model(x_t, sigma, transformer_options={**self.options}, **conds)


def signal_scale(patcher):
    """σ → a(σ) in the model's noising x_t = a·x_0 + σ·ε (1 for ε and v prediction, 1 − σ for flow models such as
    Wan), read off its own noise_scaling: no noise on a latent of ones."""
    sampling = compat.model_sampling(patcher)
    return lambda sigma: sampling.noise_scaling(sigma, torch.zeros_like(sigma), torch.ones_like(sigma))


def sigma_table(patcher) -> torch.Tensor:
    """The model's discrete sigmas: the noise levels distillation trains at."""
    return compat.model_sampling(patcher).sigmas
