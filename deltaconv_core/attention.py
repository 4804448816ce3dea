"""Drop-in replacements for a model's self-attention modules that run a student instead (students.py): a
ΔConvBlock, or a MediatorAttention at the mediator count its schedule gives for the step's sigma.

Each wrapper keeps the original projections registered under their original names (so state-dict keys, LoRA,
SAG and PAG keep working) and an unregistered reference to the original attention, which it falls back to per
call whenever the input is not a plain image (or video) token grid or the student is switched off for the current
sigma. Every student takes the same call (`Student.run`); what changes per step is worked out once per step
(`Step`).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .mediator_schedule import SigmaCounts
from .speed_policy import SpeedPolicy

log = logging.getLogger("deltaconv")
# Fallbacks that are the settings at work, not a problem to warn about: outside the sigma range; the speed policy's
# plan for the whole call (logged once by the policy).
QUIET_FALLBACKS = ("attention:sigma", "attention:plan")


class Route(NamedTuple):
    """Where one call goes: the student on the (h, w) or (t, h, w) token grid, or the original attention for
    `reason`."""
    grid: tuple[int, ...] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Step:
    """The facts of one sampling step, worked out once and read by every site: whether the students run (the
    sigma is inside ΔConv Patch's range), the sigma, and each scheduled student's setting (mediators: the count)."""
    active: bool = True
    sigma: float | None = None  # the batch's largest; None: the model was called outside sampling
    settings: dict[str, Any] = field(default_factory=dict)  # site name → setting, for students with a schedule
    latent_shape: tuple[int, ...] | None = None  # the step's latent, as the model wrapper saw it (Wan's grid)
    plan: str = "chosen"  # the speed policy's plan for the call (speed_policy.PLANS): whose choice each site runs


class Recorded(NamedTuple):
    """One teacher call, as recorded: its input tokens, grid, attention output and the call's other arguments
    (Wan's RoPE `freqs`: the locality analysis needs the positions the attention saw)."""
    x: torch.Tensor
    grid: tuple[int, ...]
    out: torch.Tensor
    call: dict


class TeacherSwitch:
    """Training-time state of one patched model: while `on`, every wrapper runs its original attention (the
    teacher); while `recording` is a dict, each such call stores site → Recorded; while
    `mediators` is a count, every mediator student runs that count (the one distillation trains this step)."""

    def __init__(self):
        self.on = False
        self.recording: dict | None = None
        self.mediators: int | None = None

    def run(self, site: str, original, x, grid, **kwargs):
        out = original(x, **kwargs)
        if self.recording is not None and grid is not None:  # calls that are not a plain grid train nothing
            self.recording[site] = Recorded(x.detach(), grid, out.detach(), kwargs)
        return out


class PatchRuntime:
    """Sampling-time state shared by all wrappers of one patched model: the active sigma range, each scheduled
    site's schedule, the current `Step`, the speed policy and call counters; plus the teacher switch that
    distillation flips."""

    def __init__(self, sigma_start: float = math.inf, sigma_end: float = 0.0, speed: SpeedPolicy | None = None):
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.speed = speed or SpeedPolicy("always")
        self.schedules: dict[str, SigmaCounts] = {}  # site name → its student's schedule on this model's sigmas
        self.counts: Counter = Counter()  # "<kind>", "<kind>:<setting>" and "attention:<reason>" per call
        self.site_counts: Counter = Counter()  # student calls per site name
        self.teacher = TeacherSwitch()
        self.step: Step | None = None  # set around each step by a model wrapper (nodes/wrappers.py)
        self.stashed_options = None  # older ComfyUI: extra_options captured by an attn1_patch just before attn1
        self._seen: tuple = (object(), None)  # (sigmas, Step) of the last call outside a wrapped step
        self._calls: list[tuple[str, str]] = []  # (site, counter key) of the calls of the current step
        self._warned: set = set()

    @property
    def full_range(self) -> bool:
        return self.sigma_start == math.inf and self.sigma_end <= 0.0

    def step_from(self, sigmas, latent_shape: tuple[int, ...] | None = None) -> Step:
        """A step's facts from its sigmas (None: outside sampling, where scheduled students run their last
        setting, that of the final steps) and latent shape. Reads the tensor once: each read syncs with the GPU."""
        if sigmas is None:
            return Step(settings={site: counts.counts[-1] for site, counts in self.schedules.items()},
                        latent_shape=latent_shape)
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        active = self.full_range or self.sigma_end <= sigma <= self.sigma_start
        return Step(active, sigma, {site: counts(sigma) for site, counts in self.schedules.items()}, latent_shape)

    def current_step(self, sigmas=None) -> Step:
        """The step being run. Inside a wrapped step, the facts were worked out once before the diffusion model
        ran (under torch.compile a read of the sigma tensor in a site would break the graph); otherwise (the
        March-2024 ComfyUI, a model called outside sampling) from the sigmas the sites see, once per tensor."""
        if self.step is not None:
            return self.step
        if sigmas is not self._seen[0]:
            self._seen = (sigmas, self.step_from(sigmas))
        return self._seen[1]

    def setting(self, site: str, step: Step):
        """What a site's student runs this step: the count distillation trains, else its schedule's setting."""
        if self.teacher.mediators is not None and site in self.schedules:
            return self.teacher.mediators
        return step.settings.get(site)

    def ran_student(self, site: str, key: str):
        self._record(site, key)

    def fallback(self, site: str, reason: str):
        self._record(site, f"attention:{reason}")

    def _record(self, site: str, key: str):
        # Appended, not counted: under torch.compile dynamo replays the appends after the graph runs, and the list
        # is empty at every step's start, so nothing here changes its guards (a counter it read would recompile
        # the model every step). Counted at the end of the step, or at once outside a wrapped step.
        self._calls.append((site, key))
        if self.step is None:
            self.end_step()

    def begin_step(self, sigmas, latent_shape: tuple[int, ...] | None = None):
        """Work out the step's facts for every site (the model wrapper calls this before the diffusion model, with
        the latent's shape: the token grid of sites whose call does not say it)."""
        self.step = self.step_from(sigmas, latent_shape)

    def run_step(self, sigmas, x: torch.Tensor, call: Callable[[], Any]):
        """One model call made by the model wrapper: the step's facts from its sigmas and its input x (the latent),
        the speed policy's plan for calls of x's shape (timed the first time, each timing run a call of its own
        that leaves no count behind), then the call itself."""
        self.begin_step(sigmas, tuple(x.shape))
        step = self.step

        def run(plan: str):
            self.step = replace(step, plan=plan)
            try:
                return call()
            finally:
                self._calls.clear()

        try:
            if step.active:
                self.step = replace(step, plan=self.speed.call_plan(x, run))
            return call()
        finally:
            self.end_step()

    def end_step(self):
        """Count the step's calls (and warn once per site about fallbacks); the step is over."""
        self.step = None
        for site, key in self._calls:
            self.counts[key] += 1
            if not key.startswith("attention:"):
                self.site_counts[site] += 1
            elif key not in QUIET_FALLBACKS and (site, key) not in self._warned:
                self._warned.add((site, key))
                log.warning("ΔConv: %s runs the original attention (%s); logged once per site", site, key[10:])
        self._calls.clear()


class _Wrapper(nn.Module):
    """What the wrappers share: the original module (unregistered), the student, the runtime and the routing.

    A student with a schedule (mediators) runs the setting `sigma_counts` gives for the step's sigma. A wrapper
    made by `teacher_only` has no student: it always runs the original attention through the teacher switch (to
    record what the model's attention sees, as the locality analysis does).
    """
    PROJECTIONS: tuple[str, ...] = ()  # the original's modules and attributes, registered under their own names
    OPTIONAL: tuple[str, ...] = ()  # ... and those only some versions of the original have

    def __init__(self, original: nn.Module, student: nn.Module | None, runtime: PatchRuntime, site: str,
                 sigma_counts: SigmaCounts | None = None, *, grid: Callable[[torch.Size, dict], tuple | str]):
        super().__init__()
        if student is not None and (student.config.schedule is None) != (sigma_counts is None):
            raise ValueError(f"{site}: a student with a schedule needs it on the model's sigmas, others none")
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
        self.grid = grid  # the family adapter's token_grid on this model: a call's grid, or why there is none
        if sigma_counts is not None:
            runtime.schedules[site] = sigma_counts

    @classmethod
    def teacher_only(cls, original: nn.Module, runtime: PatchRuntime, site: str, **kwargs):
        return cls(original, None, runtime, site, **kwargs)

    @property
    def is_teacher_only(self) -> bool:
        return self.student is None

    @property
    def student_type(self) -> str | None:
        """The student's kind ("deltaconv", "mediators": the type names of our weight files); None when
        teacher-only."""
        return None if self.student is None else self.student.kind

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def _route(self, x, step: Step, call: dict) -> Route:
        """The student on the call's token grid, as the family's token_grid reads it from `call`; the original
        attention while the step is outside the sigma range, or when the call has no plain grid."""
        if not step.active:
            return Route(reason="sigma")
        grid = self.grid(x.shape, call)
        return Route(reason=grid) if isinstance(grid, str) else Route(grid=grid)

    def _run(self, x, route: Route, step: Step, kwargs: dict):
        if self.is_teacher_only or self.runtime.teacher.on:
            return self.runtime.teacher.run(self.site, self.original, x, route.grid, **kwargs)
        if route.grid is None:
            self.runtime.fallback(self.site, route.reason)
            return self.original(x, **kwargs)
        if step.plan == "attention":
            self.runtime.fallback(self.site, "plan")
            return self.original(x, **kwargs)
        setting = self.runtime.setting(self.site, step)
        key = self.student.kind if setting is None else f"{self.student.kind}:{setting}"
        student = lambda: self.student.run(x, route.grid, setting)
        attention = lambda: self.original(x, **kwargs)
        if step.plan == "chosen" and not self.runtime.speed.student_is_faster(self.site, key, x, student, attention):
            self.runtime.fallback(self.site, "slower")
            return attention()
        self.runtime.ran_student(self.site, key)
        return student()


class StudentSelfAttention(_Wrapper):
    """Replaces a UNet `attn1` (CrossAttention): forward(x, context, value, mask, transformer_options)."""
    PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
    OPTIONAL = ("heads", "dim_head", "attn_precision")

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        options = transformer_options if transformer_options is not None else self.runtime.stashed_options or {}
        step = self.runtime.current_step(options.get("sigmas"))
        route = self._route(x, step, {"transformer_options": options})  # ToMe, HyperTile: tokens rearranged
        elsewhere = any(t is not None and t is not x for t in (context, value)) or mask is not None
        if route.grid is not None and elsewhere:
            route = Route(reason="context")  # keys/values from elsewhere (reference-only, hypernetworks)
        kwargs = {"context": context, "value": value, "mask": mask}
        if transformer_options is not None:
            kwargs["transformer_options"] = transformer_options
        return self._run(x, route, step, kwargs)


class StudentDiTAttention(_Wrapper):
    """Replaces a PixArt `blocks.i.attn`: forward(x, mask=None, HW=None, block_id=None); HW is the latent size."""
    OPTIONAL = ("qkv", "proj", "q_norm", "k_norm", "num_heads", "dim", "sr_ratio")

    def forward(self, x, mask=None, HW=None, block_id=None):
        step = self.runtime.current_step()  # DiTs see no sigma: the model wrapper's step, or outside sampling
        return self._run(x, self._route(x, step, {"HW": HW}), step, {"mask": mask, "HW": HW, "block_id": block_id})


class StudentWanAttention(_Wrapper):
    """Replaces a Wan `blocks.i.self_attn`: forward(x, freqs, transformer_options={}); freqs is the call's RoPE.

    The call does not say its grid: the adapter reads it from the step's latent shape (Step.latent_shape), so
    outside a wrapped step (a model called outside sampling) every call runs the original (grid unknown)."""
    PROJECTIONS = ("q", "k", "v", "o", "norm_q", "norm_k")
    OPTIONAL = ("dim", "num_heads", "head_dim", "window_size", "qk_norm", "eps")

    def forward(self, x, freqs, transformer_options={}):  # noqa: B006 (Wan's own signature; never mutated)
        step = self.runtime.current_step(transformer_options.get("sigmas"))
        route = self._route(x, step, {"latent_shape": step.latent_shape})
        return self._run(x, route, step, {"freqs": freqs, "transformer_options": transformer_options})
