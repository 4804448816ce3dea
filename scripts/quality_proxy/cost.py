"""What a quality-proxy model costs: multiply-accumulates of its self-attention sites over one sampling run.

Per site and model call, on an h×w grid (video: t×h×w) of C channels (N = h·w, or t·h·w, tokens):
- attention: 4·N·C² + 2·N²·C (the q/k/v/out projections, then scores and their weighted sum);
- ΔConv block: DeltaConvBlock.macs with the student's kernel and scales;
- mediator attention: mediators.mediator_macs at the count its schedule gives for that step's σ;
- zero block (attention removed): 0.
A hybrid runs its student while σ ≥ its threshold and attention below. The rest of the UNet (convolutions, MLPs)
is the same for every model and not counted. One sampling run = one call per sampler step, per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from deltaconv_core.block import BlockConfig, DeltaConvBlock
from deltaconv_core.mediator_schedule import SigmaCounts
from deltaconv_core.mediators import mediator_macs


@dataclass(frozen=True)
class Site:
    grid: tuple[int, ...]
    channels: int
    kernel: int


@dataclass(frozen=True)
class Cost:
    """How one model runs its self-attention sites: `student` is "attention", "zero", "deltaconv" (with `scales`)
    or "mediators" (with `counts`, the schedule on σ); the student runs for σ ≥ `sigma_end`, attention below.
    `time_kernel`: video students' taps over time (ΔConv's conv_time, mediators' DWC over time); 0 on images."""

    student: str
    scales: tuple = (1.0, 0.5)
    counts: SigmaCounts | None = None
    sigma_end: float = 0.0
    time_kernel: int = 0

    def site_macs(self, site: Site, sigma: float) -> int:
        n, c = math.prod(site.grid), site.channels
        if self.student == "attention" or sigma < self.sigma_end:
            return 4 * n * c * c + 2 * n * n * c
        if self.student == "zero":
            return 0
        if self.student == "deltaconv":
            return DeltaConvBlock.macs(BlockConfig(c, site.kernel, self.scales, time_kernel=self.time_kernel),
                                       site.grid)
        if self.student == "mediators":
            return mediator_macs(site.grid, c, self.counts(sigma), self.time_kernel)
        raise ValueError(f"unknown student {self.student!r}")

    def step_macs(self, sites: list[Site], sigma: float) -> int:
        return sum(self.site_macs(s, sigma) for s in sites)

    def run_macs(self, sites: list[Site], step_sigmas) -> int:
        """MACs of one sampling run (one image) with the sampler's step σ."""
        return sum(self.step_macs(sites, float(s)) for s in step_sigmas)
