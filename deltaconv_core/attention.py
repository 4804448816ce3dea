"""Drop-in replacements for a model's self-attention modules that run a student instead: a ΔConvBlock, or a
MediatorAttention at the mediator count its schedule gives for the step's sigma.

Each wrapper keeps the original projections registered under their original names (so state-dict keys, LoRA,
SAG and PAG keep working) and an unregistered reference to the original attention, which it falls back to per
call whenever the input is not a plain image-token grid or the student is switched off for the current sigma.
Both student types share the routing and the fallbacks; only the call differs (mediators take a count).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import NamedTuple

import torch
from torch import nn

from .block import DeltaConvBlock
from .mediator_schedule import SigmaCounts
from .mediators import MediatorAttention
from .speed_policy import SpeedPolicy
from .students import student_type

log = logging.getLogger("deltaconv")


def infer_grid(latent_hw, n_tokens: int):
    """(h, w) of a UNet level from the latent size and token count: the latent halved (rounding up) f times."""
    H, W = int(latent_hw[0]), int(latent_hw[1])
    h, w = H, W
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return (h, w) if h * w == n_tokens else None


class Route(NamedTuple):
    """Where one call goes: the student on the (h, w) token grid, or the original attention for `reason`;
    with the step's sigmas, which set a mediator student's count."""
    grid: tuple[int, int] | None = None
    reason: str | None = None
    sigmas: object = None


class TeacherSwitch:
    """Training-time state of one patched model: while `on`, every wrapper runs its original attention (the
    teacher); while `recording` is a dict, each such call stores site → (input, grid, attention output); while
    `mediators` is a count, every mediator student runs that count (the one distillation trains this step)."""

    def __init__(self):
        self.on = False
        self.recording: dict | None = None
        self.mediators: int | None = None

    def run(self, site: str, original, x, grid, **kwargs):
        out = original(x, **kwargs)
        if self.recording is not None and grid is not None:  # calls that are not a plain grid train nothing
            self.recording[site] = (x.detach(), grid, out.detach())
        return out


class PatchRuntime:
    """Sampling-time state shared by all wrappers of one patched model: the active sigma range, what the model
    hooks captured for them, the speed policy and call counters; plus the teacher switch that distillation flips."""

    def __init__(self, sigma_start: float = math.inf, sigma_end: float = 0.0, speed: SpeedPolicy | None = None):
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.speed = speed or SpeedPolicy("always")
        self.counts: Counter = Counter()  # "delta", "mediators:<count>" and "attention:<reason>" per call
        self.site_counts: Counter = Counter()  # student calls per site name
        self.teacher = TeacherSwitch()
        self.stashed_options = None  # older ComfyUI: extra_options captured by an attn1_patch just before attn1
        self.current_sigmas = None  # DiTs: sigmas captured by a model wrapper around each step
        self.step_active: bool | None = None  # set by that wrapper for the step it wraps, None outside a step
        self._sigma_key, self._sigma = None, None
        self._warned: set = set()

    @property
    def full_range(self) -> bool:
        return self.sigma_start == math.inf and self.sigma_end <= 0.0

    def step_sigma(self, sigmas) -> float:
        """The step's sigma (the batch's largest). Every site of one step gets the same tensor object: read it
        once, not once per site (each read syncs with the GPU)."""
        if sigmas is not self._sigma_key:
            self._sigma_key = sigmas
            self._sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        return self._sigma

    def sigma_active(self, sigmas) -> bool:
        """Whether the students run at this step. Inside a wrapped step the answer was read once, before the
        diffusion model ran: under torch.compile a read of the sigma tensor here would break the graph."""
        if self.full_range or sigmas is None:
            return True
        if self.step_active is not None:
            return self.step_active
        return self.sigma_end <= self.step_sigma(sigmas) <= self.sigma_start

    def mediator_count(self, counts: SigmaCounts, sigmas) -> int:
        """A mediator site's count: the one distillation trains, else its schedule's count at the step's sigma;
        without a sigma (a model called outside sampling) the schedule's last count, that of the final steps."""
        if self.teacher.mediators is not None:
            return self.teacher.mediators
        return counts.counts[-1] if sigmas is None else counts(self.step_sigma(sigmas))

    def ran_student(self, site: str, key: str):
        if torch.compiler.is_compiling():  # counters traced by dynamo would recompile the model every step
            return
        self.counts[key] += 1
        self.site_counts[site] += 1

    def fallback(self, site: str, reason: str):
        if torch.compiler.is_compiling():
            return
        self.counts[f"attention:{reason}"] += 1
        if reason != "sigma" and (site, reason) not in self._warned:
            self._warned.add((site, reason))
            log.warning("ΔConv: %s runs the original attention (%s); logged once per site", site, reason)


class _Wrapper(nn.Module):
    """What both wrappers share: the original module (unregistered), the student, the runtime and the routing.

    The student is a ΔConvBlock (sigma_counts None) or a MediatorAttention, which runs at the count
    `sigma_counts` gives for the step's sigma. A wrapper made by `teacher_only` has no student: it always runs the
    original attention through the teacher switch (to record what the model's attention sees, as the locality
    analysis does).
    """
    PROJECTIONS: tuple[str, ...] = ()  # the original's modules and attributes, registered under their own names
    OPTIONAL: tuple[str, ...] = ()  # ... and those only some versions of the original have

    def __init__(self, original: nn.Module, student: DeltaConvBlock | MediatorAttention | None,
                 runtime: PatchRuntime, site: str, sigma_counts: SigmaCounts | None = None):
        super().__init__()
        if isinstance(student, MediatorAttention) != (sigma_counts is not None):
            raise ValueError(f"{site}: a mediator student needs its sigma → count schedule, a ΔConv block none")
        for name in self.PROJECTIONS:
            setattr(self, name, getattr(original, name))
        for name in self.OPTIONAL:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.student = student
        self.sigma_counts = sigma_counts
        self._original = (original,)  # a tuple keeps it out of the module tree (no duplicate parameters)
        self.runtime = runtime
        self.site = site

    @classmethod
    def teacher_only(cls, original: nn.Module, runtime: PatchRuntime, site: str, **kwargs):
        return cls(original, None, runtime, site, **kwargs)

    @property
    def is_teacher_only(self) -> bool:
        return self.student is None

    @property
    def student_type(self) -> str | None:
        """"deltaconv" or "mediators" (the type names of our weight files); None when teacher-only."""
        return None if self.student is None else student_type(self.student.config)

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def _run(self, x, route: Route, kwargs: dict):
        if self.is_teacher_only or self.runtime.teacher.on:
            return self.runtime.teacher.run(self.site, self.original, x, route.grid, **kwargs)
        if route.grid is None:
            self.runtime.fallback(self.site, route.reason)
            return self.original(x, **kwargs)
        key, student = self._student_call(x, route)
        attention = lambda: self.original(x, **kwargs)
        if not self.runtime.speed.student_is_faster(self.site, key, x, student, attention):
            self.runtime.fallback(self.site, "slower")
            return attention()
        self.runtime.ran_student(self.site, key)
        return student()

    def _student_call(self, x, route: Route):
        """(counter key, the student's call on x): "delta", or "mediators:<count>" at the step's count."""
        b, n, c = x.shape
        tokens = x.reshape(b, *route.grid, c)
        if self.sigma_counts is None:
            return "delta", lambda: self.student(tokens).reshape(b, n, c)
        count = self.runtime.mediator_count(self.sigma_counts, route.sigmas)
        return f"mediators:{count}", lambda: self.student(tokens, count).reshape(b, n, c)


class DeltaConvSelfAttention(_Wrapper):
    """Replaces a UNet `attn1` (CrossAttention): forward(x, context, value, mask, transformer_options)."""
    PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
    OPTIONAL = ("heads", "dim_head", "attn_precision")

    def _route(self, x, context, value, mask, options) -> Route:
        if options is None:
            options = self.runtime.stashed_options or {}
        sigmas = options.get("sigmas")
        if not self.runtime.sigma_active(sigmas):
            return Route(reason="sigma")
        shape = options.get("activations_shape")
        if shape is not None:
            hw = (int(shape[2]), int(shape[3])) if shape[0] == x.shape[0] else None
        elif options.get("original_shape") is not None:
            latent = options["original_shape"]
            hw = infer_grid(latent[2:], x.shape[1]) if latent[0] == x.shape[0] else None
        else:
            return Route(reason="grid unknown")
        if hw is None or hw[0] * hw[1] != x.shape[1]:
            return Route(reason="tokens rearranged")  # ToMe, HyperTile, window attention
        if mask is not None or (context is not None and context is not x) or (value is not None and value is not x):
            return Route(reason="context")  # keys/values from elsewhere (reference-only, hypernetworks)
        return Route(grid=hw, sigmas=sigmas)

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        route = self._route(x, context, value, mask, transformer_options)
        kwargs = {"context": context, "value": value, "mask": mask}
        if transformer_options is not None:
            kwargs["transformer_options"] = transformer_options
        return self._run(x, route, kwargs)


class DeltaConvDiTAttention(_Wrapper):
    """Replaces a PixArt `blocks.i.attn`: forward(x, mask=None, HW=None, block_id=None); HW is the latent size."""
    OPTIONAL = ("qkv", "proj", "q_norm", "k_norm", "num_heads", "dim", "sr_ratio")

    def __init__(self, original: nn.Module, student: DeltaConvBlock | MediatorAttention | None,
                 runtime: PatchRuntime, site: str, sigma_counts: SigmaCounts | None = None, *, patch_size: int):
        super().__init__(original, student, runtime, site, sigma_counts)
        self.patch_size = patch_size

    def _route(self, x, HW) -> Route:
        if HW is None:
            return Route(reason="grid unknown")
        sigmas = self.runtime.current_sigmas
        if not self.runtime.sigma_active(sigmas):
            return Route(reason="sigma")
        h, w = math.ceil(HW[0] / self.patch_size), math.ceil(HW[1] / self.patch_size)
        return Route(grid=(h, w), sigmas=sigmas) if h * w == x.shape[1] else Route(reason="tokens rearranged")

    def forward(self, x, mask=None, HW=None, block_id=None):
        return self._run(x, self._route(x, HW), {"mask": mask, "HW": HW, "block_id": block_id})
