"""Never slower than attention: per site and input shape, the student or the model's own attention, whichever is
faster, timed once on the first call and cached; then, per model-call shape, the whole call under each plan (the
sites' choices, every student, every attention), timed once, and the fastest kept.

Why both: a site timed alone, synchronised, sees its own host and GPU time; a whole step pipelines the host ahead of
the GPU, so a student that wins alone can still slow a host-bound step (small images on a fast GPU) by its extra
launches. Only timing the call itself sees that.

Falling back is always safe for fidelity: attention is the teacher the student imitates. Only sampling is timed
(gradients off); training always runs the student. The timer is injectable, so the policy is tested on the CPU.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

log = logging.getLogger("deltaconv")

MODES = ("auto", "always")
TIMED_DEVICES = ("cuda",)  # on the CPU the student is faster at every SD/SDXL/PixArt shape measured (benchmarks)
REPEATS = 3  # timed calls per candidate after one warm-up call (compilation, autotuning, the allocator)
# What a model call runs: each site's own choice, every site's student, every site's attention. In this order ties
# go to the earlier one: attention is the exact one, and "chosen" is what the sites picked.
PLANS = ("attention", "chosen", "students")
# The all-attention plan is not timed when the chosen call takes under this share of its sites' attention time
# alone (their synchronised timings): that call cannot win, and timing it at 4096² would cost seconds.
ATTENTION_BOUND = 0.5


def device_seconds(label: str, fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median seconds of fn() after a warm-up call, host time included (it is part of a real step), synchronised
    with the device it runs on."""
    del label  # the real timer needs no name; test timers use it to answer per candidate
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Choice(NamedTuple):
    student_seconds: float
    attention_seconds: float

    @property
    def student(self) -> bool:
        return self.student_seconds < self.attention_seconds  # a tie keeps attention: it is the exact one


class SpeedPolicy:
    """`always`: the student at every call. `auto`: on a timed device (CUDA), the first sampling call of each
    (site, student key, shape, dtype, device) times the student against the original attention and the faster runs
    from then on (`student_is_faster`); around them, the first sampling call of each model-input shape times the
    whole call per plan and keeps the fastest (`call_plan`). Elsewhere the student. Thread-safe: each key is timed
    once, whoever calls first."""

    def __init__(self, mode: str = "auto", timer=device_seconds, timed_devices=TIMED_DEVICES):
        if mode not in MODES:
            raise ValueError(f"speed policy {mode!r}: choose one of {', '.join(MODES)}")
        self.mode, self.timer, self.timed_devices = mode, timer, tuple(timed_devices)
        self.choices: dict[tuple, Choice] = {}  # per site call
        self.plans: dict[tuple, tuple[str, dict[str, float]]] = {}  # per model call: the plan, and each one's time
        self._lock = threading.Lock()
        self._plan_lock = threading.Lock()  # held while a call is timed, whose sites then take `_lock`
        self._consulted: dict | None = None  # while a call is timed: the site choices it made
        self._timing: int | None = None  # the thread timing a model call's plans

    def describe(self) -> str:
        if self.mode == "always":
            return "always: the student at every call"
        return (f"auto: on {'/'.join(self.timed_devices)} each site times its student against its attention once "
                "per input shape, then the whole model call is timed with the sites' choices, every student and "
                "every attention, and the fastest runs (timings in the log); elsewhere the student")

    def _timed(self, x: torch.Tensor) -> bool:
        return (self.mode == "auto" and x.device.type in self.timed_devices and not torch.is_grad_enabled()
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing()))

    def student_is_faster(self, site: str, key: str, x: torch.Tensor, student: Callable, attention: Callable) -> bool:
        """Whether this call runs the student; times both the first time its key is seen (never while torch.compile
        traces or a CUDA graph captures: there it takes a choice already made, else the student)."""
        if not self._timed(x):
            return True
        choice_key = (site, key, tuple(x.shape), x.dtype, str(x.device))
        choice = self.choices.get(choice_key)
        if choice is None:
            if torch.compiler.is_compiling():
                return True
            with self._lock:
                choice = self.choices.get(choice_key)
                if choice is None:
                    choice = Choice(self.timer("student", student), self.timer("attention", attention))
                    self.choices[choice_key] = choice
                    log.info("ΔConv speed: %s %s %s: student %.3g ms, attention %.3g ms → %s", site, key,
                             list(x.shape), choice.student_seconds * 1e3, choice.attention_seconds * 1e3,
                             "student" if choice.student else "attention")
        if self._consulted is not None:
            self._consulted[choice_key] = choice
        return choice.student

    def call_plan(self, x: torch.Tensor, run: Callable[[str], object]) -> str:
        """The plan (PLANS) a model call with input x runs. The first time its shape, dtype and device are seen,
        `run(plan)` is timed per plan, which runs the call under that plan (first "chosen", whose warm-up makes the
        sites' choices), and the fastest is kept. Untimed ("chosen"): gradients on, mode `always`, another
        device, torch.compile tracing, a CUDA graph capturing, and a model call made inside one being timed."""
        if not self._timed(x) or torch.compiler.is_compiling() or self._timing == threading.get_ident():
            return "chosen"
        key = (tuple(x.shape), x.dtype, str(x.device))
        if key not in self.plans:
            with self._plan_lock:
                if key not in self.plans:
                    self.plans[key] = self._time_plans(run)
                    plan, seconds = self.plans[key]
                    log.info("ΔConv speed: model call %s: %s → %s", list(x.shape),
                             ", ".join(f"{p} {s * 1e3:.3g} ms" for p, s in seconds.items()), plan)
        return self.plans[key][0]

    def _time_plans(self, run: Callable[[str], object]) -> tuple[str, dict[str, float]]:
        """Each plan timed where it can differ from "chosen" and might win; the fastest, and every time taken."""
        self._consulted, self._timing = {}, threading.get_ident()
        try:
            seconds = {"chosen": self.timer("call:chosen", lambda: run("chosen"))}
            consulted, self._consulted = list(self._consulted.values()), None
            if any(not c.student for c in consulted):  # else "students" is "chosen"
                seconds["students"] = self.timer("call:students", lambda: run("students"))
            if (any(c.student for c in consulted)  # else "attention" is "chosen"
                    and seconds["chosen"] >= ATTENTION_BOUND * sum(c.attention_seconds for c in consulted)):
                seconds["attention"] = self.timer("call:attention", lambda: run("attention"))
        finally:
            self._consulted = self._timing = None
        plan = min((p for p in PLANS if p in seconds), key=seconds.__getitem__)
        return plan, {p: seconds[p] for p in PLANS if p in seconds}
