"""Mediator counts that follow the noise level: which count runs at which sigma.

One set of mediator weights serves every count; the count follows the noise level. The paper switches counts on
batch-level statistics of the sampler's updates, which ties a CFG batch or a whole batch together and is not
reproducible across batch sizes. Here the count depends only on sigma. Each start is a timestep percent, the scale
of ComfyUI's start_percent/end_percent (0 = the highest noise level, 1 = none), resolved to a sigma once per model
(model_sampling.percent_to_sigma), so every call with the same sigma gets the same count. A percent is not a share
of the steps: how many steps each count runs depends on the scheduler and the step count.

Text form: `start:count` pairs, e.g. "0.0:4,0.5:16,0.8:64": 4 mediators down to the sigma at 50 % of the timesteps,
16 down to the sigma at 80 %, then 64. For SD1.5 at 20 steps that is 10/6/4 steps with the `normal` scheduler but
9/3/8 with `karras`. A bare number ("16") is a fixed count.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from .quoting import quoted


class ScheduleError(ValueError):
    pass


EXAMPLE = "0.0:4,0.5:16,0.8:64"


@dataclass(frozen=True)
class MediatorSchedule:
    """Entry i runs from timestep percent starts[i] up to starts[i+1] (the last one to the end)."""

    starts: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self):
        starts, counts = tuple(self.starts), tuple(self.counts)
        if not starts or len(starts) != len(counts):
            raise ScheduleError(f"a schedule needs one count per start (e.g. {EXAMPLE!r}), got starts {quoted(starts)} "
                                f"and counts {quoted(counts)}")
        for s in starts:
            if not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:  # NaN fails the comparison too
                raise ScheduleError(f"start {quoted(s)} is outside [0, 1): starts are timestep percents (as "
                                    "start_percent)")
        if starts[0] != 0.0:
            raise ScheduleError(f"the first entry must start at 0.0 (the highest noise level), got {quoted(starts[0])}")
        for a, b in zip(starts, starts[1:]):
            if b <= a:
                raise ScheduleError(f"starts must increase strictly: {quoted(a)} is followed by {quoted(b)}")
        for n in counts:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ScheduleError(f"mediator count {quoted(n)} must be a whole number ≥ 1")
        object.__setattr__(self, "starts", tuple(float(s) for s in starts))
        object.__setattr__(self, "counts", counts)

    @classmethod
    def fixed(cls, count: int) -> MediatorSchedule:
        return cls((0.0,), (count,))

    @classmethod
    def parse(cls, text: str) -> MediatorSchedule:
        text = text.strip()
        if not text:
            raise ScheduleError(f"empty mediator schedule; write start:count pairs such as {EXAMPLE!r}")
        if ":" not in text and "," not in text:
            return cls.fixed(_count(text, text))
        starts, counts = [], []
        for entry in text.split(","):
            parts = entry.strip().split(":")
            if len(parts) != 2:
                raise ScheduleError(f"schedule entry {quoted(entry.strip())} is not start:count (e.g. {EXAMPLE!r})")
            try:
                start = float(parts[0])
            except ValueError as err:
                raise ScheduleError(
                    f"schedule entry {quoted(entry.strip())}: start {quoted(parts[0].strip())} is not a "
                    "number") from err
            starts.append(start)
            counts.append(_count(parts[1], entry.strip()))
        return cls(tuple(starts), tuple(counts))

    def format(self) -> str:
        return ",".join(f"{s!r}:{n}" for s, n in zip(self.starts, self.counts))

    def count_at(self, percent: float) -> int:
        """Mediator count at a timestep percent (clamped to [0, 1])."""
        return self.counts[max(0, bisect.bisect_right(self.starts, percent) - 1)]

    def segments(self) -> list[tuple[float, float, int]]:
        """(start, end, count) per entry, the last one ending at 1.0."""
        ends = self.starts[1:] + (1.0,)
        return list(zip(self.starts, ends, self.counts))

    def distinct_counts(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.counts)))

    def percent_ranges(self, count: int) -> list[tuple[float, float]]:
        """Where a count runs, as [start, end) fractions: distillation draws that count's noise levels there."""
        ranges = [(a, b) for a, b, n in self.segments() if n == count]
        if not ranges:
            raise ScheduleError(f"count {count} is not in the schedule {self.format()!r}")
        return ranges

    def training_count(self, step: int, seed: int = 0) -> int:
        """Count to train at a distillation step: shuffled rounds over the distinct counts, so each count is
        trained once every len(distinct_counts) steps. A pure function of (step, seed): resuming repeats it."""
        counts = self.distinct_counts()
        rounds, position = divmod(step, len(counts))
        order = random.Random(f"mediators/{seed}/{rounds}").sample(counts, len(counts))  # str seed: stable
        return order[position]

    def resolve(self, percent_to_sigma) -> SigmaCounts:
        """This schedule on one model's noise levels; percent_to_sigma is ComfyUI's model_sampling method."""
        return SigmaCounts(tuple(float(percent_to_sigma(s)) for s in self.starts), self.counts)


def _count(text: str, entry: str) -> int:
    try:
        value = float(text)
    except ValueError as err:
        raise ScheduleError(f"schedule entry {quoted(entry)}: count {quoted(text.strip())} is not a number") from err
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ScheduleError(f"schedule entry {quoted(entry)}: mediator count {quoted(text.strip())} must be a whole "
                             "number ≥ 1")
    return int(value)


@dataclass(frozen=True)
class SigmaCounts:
    """A schedule on sigmas: entry i runs while sigma ≤ sigmas[i] (sigmas fall as sampling proceeds)."""

    sigmas: tuple[float, ...]
    counts: tuple[int, ...]

    def __call__(self, sigma: float) -> int:
        count = self.counts[0]
        for start, n in zip(self.sigmas, self.counts):
            if sigma <= start:
                count = n
        return count
