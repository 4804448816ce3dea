"""A ΔConv-patched ComfyUI model made ready for training: its blocks, the feature taps of stage B, weights that
backward can use, and gradient checkpointing of the diffusion model's blocks."""
import comfy.utils
import torch

from ..deltaconv_core.families import feature_tap_path
from .wrappers import PREFIX


def trainable_blocks(patcher, sites) -> dict:
    """site name → the student (ΔConvBlock or MediatorAttention) inside that site's wrapper."""
    blocks = {}
    for s in sites:
        wrapper = patcher.object_patches.get(PREFIX + s.path)
        if wrapper is not None:
            blocks[s.name] = wrapper.student
    return blocks


def feature_taps(patcher, sites) -> dict:
    """site name → the module whose input is the residual stream right after that site's self-attention."""
    return {s.name: comfy.utils.get_attr(patcher.model, PREFIX + feature_tap_path(s.path)) for s in sites}


def make_backprop_safe(module: torch.nn.Module):
    """Frozen weights loaded under inference mode cannot be saved for backward: give them normal storage."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference():
                setattr(sub, name, torch.nn.Parameter(p.clone(), requires_grad=False))


class gradient_checkpointing:
    """Gradient checkpointing of the diffusion model's top-level blocks (recomputed in backward), undone after."""

    def __init__(self, patcher, enabled: bool):
        self.enabled = enabled
        dm = patcher.model.diffusion_model
        groups = [getattr(dm, n, None) for n in ("input_blocks", "output_blocks", "blocks")]
        self.modules = [m for g in groups if g is not None for m in g] + [
            m for m in [getattr(dm, "middle_block", None)] if m is not None]

    def __enter__(self):
        if self.enabled:
            for m in self.modules:
                m.forward = _checkpointed(m.forward)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            for m in self.modules:
                del m.forward  # the instance attribute goes; the class's forward is back
        return False


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
