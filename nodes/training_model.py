"""A ΔConv-patched ComfyUI model made ready for training: its blocks, the feature taps of stage B, weights that
backward can use, and gradient checkpointing of the diffusion model's blocks."""
import contextlib

import comfy.utils
import torch

from .wrappers import PREFIX, delta_runtimes


def trainable_students(patcher, sites) -> dict:
    """site name → the student (ΔConvBlock or MediatorAttention) inside that site's wrapper."""
    blocks = {}
    for s in sites:
        wrapper = patcher.object_patches.get(PREFIX + s.path)
        if wrapper is not None:
            blocks[s.name] = wrapper.student
    return blocks


def feature_taps(patcher, model_sites) -> dict:
    """site name → the module whose input is the residual stream right after that site's self-attention."""
    tap = model_sites.adapter.feature_tap_path
    return {s.name: comfy.utils.get_attr(patcher.model, PREFIX + tap(s.path)) for s in model_sites.sites}


def make_backprop_safe(module: torch.nn.Module):
    """Frozen weights loaded under inference mode cannot be saved for backward: give them normal storage."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference():
                setattr(sub, name, torch.nn.Parameter(p.clone(), requires_grad=False))


class gradient_checkpointing:
    """Gradient checkpointing of the diffusion model's top-level blocks (recomputed in backward), undone after."""

    def __init__(self, patcher, model_sites, enabled: bool):
        self.enabled = enabled
        self.modules = model_sites.adapter.checkpoint_blocks(patcher.model.diffusion_model)
        self.runtimes = delta_runtimes(patcher)

    def __enter__(self):
        if self.enabled:
            for m in self.modules:
                m.forward = _checkpointed(m.forward, self.runtimes)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            for m in self.modules:
                del m.forward  # the instance attribute goes; the class's forward is back
        return False


def _checkpointed(forward, runtimes):
    def run(*args, **kwargs):
        steps = [(r, r.step) for r in runtimes]
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), _in_step(steps)),
                                                 **kwargs)
    return run


@contextlib.contextmanager
def _in_step(steps):
    """Backward recomputes a block after its step ended: its sites see that step again (Wan's sites take their
    grid from it; without it they would fall back to attention and recompute other tensors)."""
    before = [(r, r.step) for r, _ in steps]
    for r, step in steps:
        r.step = step
    try:
        yield
    finally:
        for r, step in before:
            r.step = step
