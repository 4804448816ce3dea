"""Apply students to a ComfyUI ModelPatcher: a clone whose selected self-attention sites run wrappers around ΔConv
blocks or mediator attention, as the weights say per site."""
import logging
import math

import torch

from ..deltaconv_core.attention import PatchRuntime
from ..deltaconv_core.families import find_attention_sites, select_levels
from ..deltaconv_core.speed_policy import SpeedPolicy
from ..deltaconv_core.students import build_student, check_grid, student_class
from ..deltaconv_core.weights import DeltaConvWeights, match_sites
from . import compat
from .comfy_ops import COMFY_OPS
from .conflicts import base_mismatch, conflicts
from .patch_report import patch_report
from .wrappers import install_runtime_hooks, install_wrapper, original_attention

log = logging.getLogger("deltaconv")


def _block_dtype(reference: torch.Tensor) -> torch.dtype:
    """Store blocks like the model's own weights; fp8/quantised storage gets fp16 blocks, cast per call anyway."""
    return reference.dtype if reference.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float16


def patch_model(model, weights: DeltaConvWeights, start_percent=0.0, end_percent=1.0, levels="all",
                strict=False, block_dtype=None, mediator_schedule=None, speed_policy="auto"):
    """A clone of `model` whose selected self-attention sites run their students; returns (clone, report, runtime).

    Students are stored like the model's weights unless `block_dtype` says otherwise (fp32 masters for training).
    Mediator sites follow `mediator_schedule` (a MediatorSchedule) when given, else the schedule in the weights.
    `speed_policy`: "auto" (per site and shape, the student or attention, whichever is faster on a GPU) or "always".
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1, got {start_percent} and {end_percent}")
    diffusion_model = model.model.diffusion_model
    model_sites = find_attention_sites(diffusion_model)
    chosen = select_levels(model_sites, levels)
    sites = [s for s in model_sites.sites if s.level in chosen]
    match = match_sites(weights, model_sites, sites)
    if match.missing and strict:
        raise ValueError(f"{len(match.missing)} of {len(sites)} self-attention sites have no ΔConv block in "
                         f"{weights.source}, first {match.missing[0].label}; turn strict off to patch the rest")
    if not match.present:
        raise ValueError(f"{weights.source} has no block for any selected site of this {model_sites.variant}")

    sampling = compat.model_sampling(model)
    # percent_to_sigma(0) is a large finite number, not inf: without this the full range would look partial
    start_sigma = math.inf if start_percent <= 0 else sampling.percent_to_sigma(start_percent)
    runtime = PatchRuntime(start_sigma, sampling.percent_to_sigma(end_percent), SpeedPolicy(speed_policy))
    clone = model.clone()
    notes = conflicts(model, sites)
    references = {}  # site name → its q/qkv weight: the dtype of its student, and the base-model fingerprint
    schedules = {}  # mediator sites: site name → the schedule they run
    for site, config, state in match.present:
        check_grid(student_class(config), model_sites)
        original = original_attention(model, model_sites, site)
        reference = references[site.name] = model_sites.adapter.projection_weight(original)
        student = build_student(config, state, ops=COMFY_OPS, dtype=block_dtype or _block_dtype(reference))
        sigma_counts = None
        if config.schedule is not None:
            schedules[site.name] = mediator_schedule or config.schedule
            sigma_counts = schedules[site.name].resolve(sampling.percent_to_sigma)
        install_wrapper(clone, model_sites, site, original, student, runtime, sigma_counts)
    install_runtime_hooks(clone, runtime)

    notes += base_mismatch(weights, references)
    if mediator_schedule is not None and not schedules:
        notes.append("mediator_schedule is ignored: no patched site runs mediator attention")
    report = patch_report(model_sites, weights, sites, match, start_percent, end_percent, levels, notes,
                          schedules, sampling.percent_to_sigma, overridden=mediator_schedule is not None,
                          speed=runtime.speed)
    for line in report.splitlines():
        log.info("ΔConv: %s", line.strip())
    return clone, report, runtime
