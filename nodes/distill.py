"""ΔConv Distill: train ΔConv blocks or mediator attention from the frozen model inside ComfyUI (stage A block-local,
stage B end-to-end)."""
import logging
import os
from typing import ClassVar

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..deltaconv_core.distill import STAGES, TRAINING_DTYPES, DistillConfig, DistillError
from ..deltaconv_core.families import find_attention_sites
from ..deltaconv_core.mediator_schedule import EXAMPLE
from ..deltaconv_core.students import DELTACONV, MEDIATORS, STUDENT_TYPES
from . import compat
from .distill_run import Interrupted, check_latents, fresh_students, train_blocks
from .folders import FOLDER
from .validation import (
    check_widgets,
    kernel_preset_error,
    output_path,
    output_path_error,
    parse_kernel_preset,
    parse_mediator_schedule,
    require_widgets,
    reserved_run,
    validates_widgets,
)

log = logging.getLogger("deltaconv")
# What a checkpoint's name adds to filename_prefix, at most: `_<run>_<stage>_<step>.safetensors`.
CHECKPOINT_SUFFIX_BYTES = len("_000001_A_00000001.safetensors")


def schedule_error(text) -> bool | str:
    """mediator_schedule's verdict in VALIDATE_INPUTS form (None: connected; empty: the default or the weights')."""
    if isinstance(text, str):
        try:
            parse_mediator_schedule(text)
        except ValueError as e:
            return str(e)
    return True


def output_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), FOLDER)


@validates_widgets
class DeltaConvDistill:
    DESCRIPTION = ("Distils ΔConv blocks, or mediator attention, from the frozen model (teacher and student share "
                   "it). Stage A trains each block on recorded attention in/outputs (cheap); stage B trains "
                   "end-to-end on noise, teacher and "
                   "feature losses. Checkpoints go to output/deltaconv; connect a checkpoint as `deltaconv` to "
                   "resume or fine-tune. Interrupting stops cleanly and keeps what was learned.")
    CATEGORY = "ΔConv/training"
    SEARCH_ALIASES = ("distill", "train attention", "distillation", "convfusion", "linear attention", "speed",
                      "train deltaconv")
    RETURN_TYPES = ("DELTACONV", "LOSS_MAP", "STRING")
    RETURN_NAMES = ("deltaconv", "loss", "checkpoint")
    OUTPUT_TOOLTIPS = ("The trained blocks: connect to ΔConv Save, or to ΔConv Patch to try them at once.",
                       "Loss per step (for a loss graph node).",
                       "Path of the last checkpoint written to output/deltaconv (it resumes the run).")
    FUNCTION = "distill"
    EXPERIMENTAL = True
    # Choices as older releases saved them: still accepted, and run as their key (CHANGELOG.md).
    LEGACY_CHOICES: ClassVar = {"stage": {"A: block-local": "A", "B: end-to-end": "B"},
                                "student": {"ΔConv block": DELTACONV, "mediator attention": MEDIATORS}}

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        for verdict in (check_widgets(cls, widgets),
                        output_path_error(output_dir(), widgets.get("filename_prefix"), "filename_prefix",
                                          CHECKPOINT_SUFFIX_BYTES),
                        kernel_preset_error(widgets.get("kernel_preset")),
                        schedule_error(widgets.get("mediator_schedule"))):
            if verdict is not True:
                return verdict
        return True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The teacher; its self-attention is what the blocks learn."}),
                "latents": ("LATENT", {"tooltip": "Training latents: VAE-encoded images, or the model's own "
                                                  "KSampler outputs for data-free distillation."}),
                "positive": ("CONDITIONING", {"tooltip": "One prompt for all latents, or one entry per latent."}),
                "stage": (list(STAGES), {"default": STAGES[0],
                                         "tooltip": "A: block-local, each block learns its layer's recorded "
                                                    "attention (cheap, start here). B: end-to-end on the model's "
                                                    "output (needs far more memory; run after A)."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000,
                                  "tooltip": "Total optimiser steps (a resumed run continues up to this)."}),
                "learning_rate": ("FLOAT", {"default": 3e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "tooltip": "AdamW learning rate: reached by the linear warm-up, "
                                                       "then held constant (no decay)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 1024,
                                       "tooltip": "Latents per optimiser step; lower it on out-of-memory."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1,
                                 "tooltip": "Seed of the fresh blocks, the noise and the latent order."}),
                "save_every": ("INT", {"default": 500, "min": 0, "max": 1_000_000,
                                       "tooltip": "Checkpoint interval in steps (0: only at the end)."}),
                "filename_prefix": ("STRING", {"default": "deltaconv_distilled",
                                               "tooltip": "Checkpoints are output/deltaconv/<prefix>_<run>_<stage>_"
                                                          "<step>.safetensors, the run numbered so nothing is "
                                                          "replaced; subfolders such as 'runs/a' are fine."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Empty/negative prompt used for caption drop (15%)."}),
                "deltaconv": ("DELTACONV", {"tooltip": "Blocks to start from: resume (same stage) or fine-tune."}),
                "warmup_steps": ("INT", {"default": 500, "min": 0, "max": 100_000,
                                         "tooltip": "Steps of linear learning-rate warm-up."}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024,
                                              "tooltip": "Batches per optimiser step: a larger effective batch "
                                                         "without more memory."}),
                "training_dtype": (list(TRAINING_DTYPES), {"default": "bf16",
                                                           "tooltip": "Autocast precision of the forward passes "
                                                                      "(weights stay fp32); fp32 on old GPUs "
                                                                      "and the CPU."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Stage B: recompute the UNet's activations in "
                                                                  "backward to save memory."}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0,
                                            "tooltip": "Stage B loss weighting; 0 = off, 5 = the paper."}),
                "kernel_preset": ("STRING", {"default": "", "tooltip": "Kernel sizes of fresh blocks. Empty: the "
                                                                       "official ones; an odd number (1-17) for "
                                                                       "all; or JSON {block name: kernel size} "
                                                                       "(video blocks: [spatial, time]) from "
                                                                       "ΔConv Attention Locality. Ignored when "
                                                                       "deltaconv is connected."}),
                "allow_cpu": ("BOOLEAN", {"default": False, "tooltip": "Train even when ComfyUI runs on the "
                                                                       "CPU (very slow)."}),
                "student": (list(STUDENT_TYPES), {
                    "default": DELTACONV,
                    "tooltip": "What replaces each self-attention layer. deltaconv: ΔConv blocks, convolutions "
                               "(fastest, local). mediators: mediator attention, global attention through a few "
                               "pooled mediator tokens, their number following the noise level; starts from the "
                               "model's own attention weights. Ignored when deltaconv is connected (its students "
                               "are trained)."}),
                "mediator_schedule": ("STRING", {
                    "default": "",
                    "tooltip": f"Mediator attention: how many mediators run when, as start:count pairs where start "
                               f"is a timestep percent as in start_percent (0 = most noise, 1 = none; the steps "
                               f"each count gets depend on the scheduler), e.g. '{EXAMPLE}' (the default when "
                               f"empty), or one count such as '16'. Every count is trained at the noise levels "
                               f"where it runs; the schedule is saved with the weights. Empty with deltaconv "
                               f"connected: its schedule."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def distill(self, model, latents, positive, stage, steps, learning_rate, batch_size, seed, save_every,
                filename_prefix, negative=None, deltaconv=None, warmup_steps=500, grad_accumulation=1,
                training_dtype="bf16", gradient_checkpointing=False, min_snr_gamma=0.0, kernel_preset="",
                allow_cpu=False, student=DELTACONV, mediator_schedule="", unique_id=None):
        widgets = require_widgets(type(self), locals())  # choices saved by older releases: their current keys
        prefix_path = output_path(output_dir(), filename_prefix, "filename_prefix", CHECKPOINT_SUFFIX_BYTES)
        if deltaconv is not None and (kernel_preset or "").strip():
            ignored = "kernel_preset is ignored: deltaconv is connected, and its blocks keep their kernel sizes"
            log.warning("ΔConv Distill: %s", ignored)
            compat.send_progress_text(unique_id, ignored)
        if comfy.model_management.get_torch_device().type == "cpu" and not allow_cpu:
            raise DistillError("ComfyUI runs on the CPU here, where distillation is very slow. Start ComfyUI with "
                               "a GPU, or turn on allow_cpu to train anyway.")
        check_latents(model, latents["samples"])
        sites = find_attention_sites(model.model.diffusion_model)
        config = DistillConfig(stage=widgets["stage"], steps=steps, learning_rate=learning_rate,
                               batch_size=batch_size, seed=seed, warmup_steps=warmup_steps,
                               grad_accumulation=grad_accumulation, min_snr_gamma=min_snr_gamma,
                               training_dtype=training_dtype, gradient_checkpointing=gradient_checkpointing,
                               save_every=save_every, student=widgets["student"], mediator_schedule=mediator_schedule)
        start = deltaconv or fresh_students(model, config, parse_kernel_preset(kernel_preset, sites.sites))
        pbar = comfy.utils.ProgressBar(steps)

        def should_stop():
            return comfy.model_management.processing_interrupted()

        def on_step(step, loss):
            compat.send_progress_text(unique_id, f"step {step}/{steps}  loss {loss:.5g}")
            if step % 50 == 0 or step == steps:
                log.info("ΔConv Distill: step %d/%d loss %.5g", step, steps, loss)
            try:
                pbar.update_absolute(step, steps)
            except comfy.model_management.InterruptProcessingException as e:  # raised by the UI's progress hook
                raise Interrupted from e

        try:
            # ComfyUI runs nodes under inference mode; the run number is held until the last checkpoint is written
            with reserved_run(prefix_path) as run_prefix, torch.inference_mode(False), torch.enable_grad():
                result = train_blocks(model, latents["samples"], positive, negative, start, config,
                                      os.path.dirname(run_prefix), os.path.basename(run_prefix),
                                      should_stop=should_stop, on_step=on_step)
        except Interrupted as e:
            compat.send_progress_text(unique_id, f"cancelled; saved {e.checkpoint}")
            # The blocks are saved; now cancel like core nodes do: the flag consumed, nothing downstream runs.
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException() from None
        if result.skipped_steps:
            compat.send_progress_text(unique_id, f"{result.skipped_steps} of {steps} steps skipped: non-finite "
                                                 "gradients")
        return (result.weights, {"loss": result.losses, "skipped_steps": result.skipped_steps}, result.checkpoint)
