"""ΔConv Distill (simple): ΔConv Distill with its settings chosen by a preset, logged so they can be reproduced.

Each preset is one or two phases; a phase is a full set of ΔConv Distill widget values (its defaults, then the
preset's), run through ΔConv Distill itself, so both nodes share one code path. Two phases (stage A, then stage B
starting from A's blocks) are two ΔConv Distill runs in a row.
"""
import json
import logging
from typing import ClassVar

import comfy.model_management
import torch

from ..deltaconv_core.distill import DistillError
from ..deltaconv_core.families import find_attention_sites
from ..deltaconv_core.students import DELTACONV, students_for
from . import compat
from .distill import CHECKPOINT_SUFFIX_BYTES, DeltaConvDistill, output_dir
from .validation import check_widgets, output_path_error, require_widgets, validates_widgets, widget_inputs

log = logging.getLogger("deltaconv")

STAGE_A = {"stage": "A", "steps": 2000, "learning_rate": 3e-4, "warmup_steps": 200, "save_every": 500}
# Stage B as the paper trains: Min-SNR-γ 5; gradient checkpointing so it fits more GPUs (slower, same result).
STAGE_B = {"stage": "B", "steps": 10000, "learning_rate": 1e-4, "warmup_steps": 500,
           "save_every": 1000, "gradient_checkpointing": True, "min_snr_gamma": 5.0}
FINE_TUNE = {**STAGE_B, "steps": 2000, "learning_rate": 5e-5, "warmup_steps": 100, "save_every": 500}
CHECK = {"steps": 2, "save_every": 0, "allow_cpu": True}  # the second step holds all memory a run needs
PRESETS = {"quick": (STAGE_A,), "full": (STAGE_A, STAGE_B), "fine_tune": (FINE_TUNE,),
           "check": ({**STAGE_A, **CHECK}, {**STAGE_B, **CHECK})}
BATCH_SIZE = 4  # fewer when there are fewer latents


def advanced_defaults() -> dict:
    """Every widget input of ΔConv Distill with its default value (a combo without one: its first choice)."""
    return {name: options["default"] if "default" in options else kind[0]
            for name, (kind, options) in widget_inputs(DeltaConvDistill).items()}


def training_dtype(device) -> str:
    """bf16 autocast where the GPU computes in bf16 natively (compute capability 8 on: NVIDIA Ampere), else fp32."""
    return "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"


def fitting_student(model) -> str:
    """ΔConv blocks where they run on the model's token grids, else the first student that does (mediator
    attention): this node has no student widget, so it picks one that can train on the model."""
    return students_for(find_attention_sites(model.model.diffusion_model))[0]


def preset_settings(preset: str, filename_prefix: str, n_latents: int, device, student: str = DELTACONV) -> list[dict]:
    """The ΔConv Distill widget values of each phase of `preset`: every input, as the advanced node takes them."""
    machine = {"batch_size": min(BATCH_SIZE, n_latents), "training_dtype": training_dtype(device),
               "filename_prefix": filename_prefix, "student": student}
    return [{**advanced_defaults(), **machine, **phase} for phase in PRESETS[preset]]


@validates_widgets
class DeltaConvDistillSimple:
    DESCRIPTION = ("ΔConv Distill with its settings chosen by a preset: quick (stage A), full (stage A, then stage B "
                   "from A's blocks), fine_tune (the connected blocks), or check (2 steps per stage). It logs every "
                   "ΔConv Distill setting it used, so ΔConv Distill reproduces the run. Needs a GPU, except check. "
                   "Trains ΔConv blocks, or mediator attention where ΔConv blocks do not run (the log says which).")
    CATEGORY = "ΔConv/training"
    SEARCH_ALIASES = ("distill simple", "train deltaconv", "distillation", "convfusion", "linear attention",
                      "speed", "preset")
    RETURN_TYPES = DeltaConvDistill.RETURN_TYPES
    RETURN_NAMES = DeltaConvDistill.RETURN_NAMES
    OUTPUT_TOOLTIPS = ("The trained blocks (of the last phase): connect to ΔConv Save, or to ΔConv Patch to try "
                       "them at once.",
                       "Loss per step, the phases one after the other (for a loss graph node).",
                       "Path of the last checkpoint written to output/deltaconv (connect it through ΔConv Load to "
                       "resume).")
    FUNCTION = "distill"
    EXPERIMENTAL = True
    # Presets as older releases saved them: still accepted, and run as their key (CHANGELOG.md).
    LEGACY_CHOICES: ClassVar = {"preset": {
        "quick: stage A, 2000 steps": "quick",
        "full: stage A 2000 steps, then stage B 10000 steps": "full",
        "fine-tune connected blocks: stage B, 2000 steps at a low learning rate": "fine_tune",
        "check: stage A then B, 2 steps each (runs on the CPU too)": "check"}}

    @classmethod
    def INPUT_TYPES(cls):
        presets = list(PRESETS)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The teacher; its self-attention is what the blocks learn."}),
                "latents": ("LATENT", {"tooltip": "Training latents: VAE-encoded images, or the model's own "
                                                  "KSampler outputs for data-free distillation. Up to 4 per step."}),
                "positive": ("CONDITIONING", {"tooltip": "One prompt for all latents, or one entry per latent."}),
                "preset": (presets, {"default": presets[0],
                                     "tooltip": "quick: stage A (block-local, cheap), 2000 steps. full: stage A "
                                                "2000 steps, then stage B (end-to-end, the paper's recipe, far "
                                                "more memory) 10000 steps from A's blocks. fine_tune: stage B, "
                                                "2000 steps at a low learning rate, on the connected blocks, e.g. "
                                                "official ones for your fine-tuned checkpoint. check: stage A then "
                                                "B, 2 steps each, to test memory and setup first (runs on the CPU "
                                                "too). The log lists every setting used."}),
                "filename_prefix": ("STRING", {"default": "deltaconv_distilled",
                                               "tooltip": "Checkpoints are output/deltaconv/<prefix>_<run>_<stage>_"
                                                          "<step>.safetensors, each phase a new run number; "
                                                          "subfolders such as 'runs/a' are fine."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Empty/negative prompt: when connected, 15% of samples "
                                                         "train on it (caption drop), as the paper does."}),
                "deltaconv": ("DELTACONV", {"tooltip": "Blocks to start from; fine_tune needs them. A checkpoint "
                                                       "of the same stage resumes its run up to the preset's "
                                                       "steps."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        verdict = check_widgets(cls, widgets)
        if verdict is not True:
            return verdict
        return output_path_error(output_dir(), widgets.get("filename_prefix"), "filename_prefix",
                                 CHECKPOINT_SUFFIX_BYTES)

    def distill(self, model, latents, positive, preset, filename_prefix, negative=None, deltaconv=None,
                unique_id=None):
        preset = require_widgets(type(self), locals())["preset"]  # a preset saved by an older release: its key
        if preset == "fine_tune" and deltaconv is None:
            raise DistillError("the fine_tune preset trains the blocks connected as deltaconv (ΔConv Load): "
                               "connect them, or choose quick or full for fresh blocks")
        device = comfy.model_management.get_torch_device()
        if device.type == "cpu" and not all(p.get("allow_cpu") for p in PRESETS[preset]):
            raise DistillError(f"ComfyUI runs on the CPU here, where the {preset} preset would take days. Start "
                               "ComfyUI with a GPU; the check preset runs on the CPU too.")
        phases = preset_settings(preset, filename_prefix, latents["samples"].shape[0], device, fitting_student(model))
        weights, losses, checkpoint = deltaconv, [], None
        for i, settings in enumerate(phases, 1):
            start = ("fresh blocks" if weights is None else "the connected deltaconv" if i == 1 else
                     f"phase {i - 1}'s deltaconv output")
            text = (f"preset {preset!r}, phase {i}/{len(phases)}: ΔConv Distill with {json.dumps(settings)}, "
                    f"starting from {start}")
            log.info("ΔConv Distill (simple): %s", text)
            compat.send_progress_text(unique_id, text)
            weights, loss, checkpoint = DeltaConvDistill().distill(model, latents, positive, negative=negative,
                                                                   deltaconv=weights, unique_id=unique_id,
                                                                   **settings)
            losses += loss["loss"]
        return (weights, {"loss": losses}, checkpoint)
