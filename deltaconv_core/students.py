"""The students that can replace a self-attention site, by the type name our weight files record per site.

deltaconv: ΔConvBlock (BlockConfig); mediators: MediatorAttention (MediatorConfig). A site's config says which.
"""
from __future__ import annotations

from .block import TORCH_OPS, BlockConfig, DeltaConvBlock
from .mediators import MediatorAttention, MediatorConfig
from .quoting import quoted

DELTACONV, MEDIATORS = "deltaconv", MediatorConfig.student
STUDENT_TYPES = (DELTACONV, MEDIATORS)


def student_type(config: BlockConfig | MediatorConfig) -> str:
    return MEDIATORS if isinstance(config, MediatorConfig) else DELTACONV


def config_from_dict(d: dict) -> BlockConfig | MediatorConfig:
    """A site's config from our metadata. Entries without a student type are ΔConv: files written before
    mediators existed, and ΔConv entries still, so that ΔConv-only files stay readable by older versions."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {quoted(d)}")
    kind = d.get("student", DELTACONV)
    if kind == MEDIATORS:
        return MediatorConfig.from_dict(d)
    if kind == DELTACONV:
        return BlockConfig.from_dict({k: v for k, v in d.items() if k != "student"})
    raise ValueError(f"unknown student type {quoted(kind)}; known: {', '.join(STUDENT_TYPES)}")


def build_student(config: BlockConfig | MediatorConfig, state_dict: dict | None = None, ops=TORCH_OPS, device=None,
                  dtype=None):
    """The module for a site's config: loaded from `state_dict` (strict) when given, freshly initialised otherwise."""
    cls = MediatorAttention if isinstance(config, MediatorConfig) else DeltaConvBlock
    student = cls(config, ops=ops, device=device, dtype=dtype)
    if state_dict is None:
        student.reset_parameters()
    else:
        student.load_state_dict(state_dict, strict=True)
    return student
