"""Never slower than attention: per site and input shape, the student or the model's own attention, whichever is
faster, timed once on the first call and cached.

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
    from then on; elsewhere the student. Thread-safe: each key is timed once, whoever calls first."""

    def __init__(self, mode: str = "auto", timer=device_seconds, timed_devices=TIMED_DEVICES):
        if mode not in MODES:
            raise ValueError(f"speed policy {mode!r}: choose one of {', '.join(MODES)}")
        self.mode, self.timer, self.timed_devices = mode, timer, tuple(timed_devices)
        self.choices: dict[tuple, Choice] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        if self.mode == "always":
            return "always: the student at every call"
        return (f"auto: on {'/'.join(self.timed_devices)} each site times its student against its attention once "
                "per input shape and runs the faster (timings in the log); elsewhere the student")

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
        return choice.student
