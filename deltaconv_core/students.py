"""The students that can replace a self-attention site: what each must provide, and the one place they are listed.

A student is an nn.Module class implementing `Student`; its config class (a frozen dataclass) says which student
a site has (`config.student`, the type name our weight files record per site). Weight files, distillation,
patching and the reports call this protocol and never ask which student they hold. Adding a student: one module
implementing it, plus its entry in STUDENTS (docs/design.md, "Adding a student").
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from .block import TORCH_OPS, DeltaConvBlock
from .mediator_schedule import MediatorSchedule
from .mediators import MediatorAttention
from .quoting import quoted


class StudentConfig(Protocol):
    student: ClassVar[str]  # the student's kind, as recorded in weight files
    dim: int
    schedule: MediatorSchedule | None  # what the student runs at each noise level (None: the same every step)

    def to_dict(self) -> dict: ...


class Student(Protocol):
    """One site's student: [B, H, W, C] (or a 3-D grid for video) in and out, channel-last like the grid."""

    kind: ClassVar[str]  # type name in weight files and DistillConfig.student
    label: ClassVar[str]  # for reports: "ΔConv block", "mediator attention"
    tensor_group: ClassVar[str]  # our files store its tensors as `<site name>.<tensor_group>.<param>`
    param_pattern: ClassVar[str]  # regex of its <param> names: other tensors in a file are not its own
    config_type: ClassVar[type]  # its config dataclass: to_dict() and from_dict(), the file metadata
    grid_dims: ClassVar[tuple[int, ...]]  # the token grids it runs on: 2, (h, w); 3, (t, h, w) (families' grid_dims)
    config: StudentConfig

    def reset_parameters(self): ...  # fresh initialisation; returns the student

    @classmethod
    def initial(cls, site, teacher, model_sites, kernel_size: int | None = None, schedule=None) -> Student:
        """A fresh student for a site of a model (its teacher attention module there), ready to distil."""

    def run(self, tokens: torch.Tensor, grid: tuple[int, ...], setting: Any) -> torch.Tensor:
        """tokens [B, N, C] laid out on `grid` → [B, N, C]; `setting`: what its schedule gives this step (None
        without a schedule)."""

    @staticmethod
    def expected_shapes(config) -> dict[str, tuple[int, ...]]: ...  # state-dict key → shape

    @staticmethod
    def macs(config, grid: tuple[int, ...], setting: Any) -> int: ...  # multiply-accumulates of one image

    @staticmethod
    def describe(configs: list) -> str: ...  # a file's sites of this kind, one phrase


STUDENTS: dict[str, type] = {cls.kind: cls for cls in (DeltaConvBlock, MediatorAttention)}
STUDENT_TYPES = tuple(STUDENTS)
DELTACONV, MEDIATORS = DeltaConvBlock.kind, MediatorAttention.kind


def students_for(model_sites) -> list[str]:
    """The kinds of student that run on the token grids of the model's family, in STUDENTS order."""
    return [kind for kind, cls in STUDENTS.items() if model_sites.adapter.grid_dims in cls.grid_dims]


def check_grid(cls: type, model_sites) -> None:
    """ValueError unless students of `cls` run on the token grids of the model's family."""
    adapter = model_sites.adapter
    if adapter.grid_dims not in cls.grid_dims:
        takes = ", ".join(students_for(model_sites))
        raise ValueError(f"a {cls.label} runs on {cls.grid_dims[0]}-D token grids, and {adapter.label} has "
                         f"{adapter.grid_dims}-D ones; its sites take: {takes}")


def student_class(config: StudentConfig) -> type:
    return STUDENTS[config.student]


def student_type(config: StudentConfig) -> str:
    return config.student


def config_from_dict(d: dict) -> StudentConfig:
    """A site's config from our metadata. Entries without a student type are ΔConv: files written before
    mediators existed, and ΔConv entries still, so that ΔConv-only files stay readable by older versions."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {quoted(d)}")
    kind = d.get("student", DELTACONV)
    if kind not in STUDENTS:
        raise ValueError(f"unknown student type {quoted(kind)}; known: {', '.join(STUDENT_TYPES)}")
    return STUDENTS[kind].config_type.from_dict({k: v for k, v in d.items() if k != "student"})


def build_student(config: StudentConfig, state_dict: dict | None = None, ops=TORCH_OPS, device=None, dtype=None):
    """The module for a site's config: loaded from `state_dict` (strict) when given, freshly initialised otherwise."""
    student = student_class(config)(config, ops=ops, device=device, dtype=dtype)
    if state_dict is None:
        student.reset_parameters()
    else:
        student.load_state_dict(state_dict, strict=True)
    return student
