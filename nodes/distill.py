"""ΔConv Distill: train ΔConv blocks or mediator attention from the frozen model inside ComfyUI (stage A block-local,
stage B end-to-end)."""
import json
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..deltaconv_core.distill import TRAINING_DTYPES, DistillConfig, DistillError
from ..deltaconv_core.families import find_attention_sites
from ..deltaconv_core.mediator_schedule import EXAMPLE
from ..deltaconv_core.students import DELTACONV, MEDIATORS
from . import compat
from .distill_run import Interrupted, check_latents, fresh_students, train_blocks
from .folders import FOLDER

log = logging.getLogger("deltaconv")
STAGE_CHOICES = ("A: block-local", "B: end-to-end")
STUDENT_CHOICES = {"ΔConv block": DELTACONV, "mediator attention": MEDIATORS}  # shown name → weight-file type


def parse_kernel_preset(text: str, sites) -> dict:
    """'' → official kernels; '9' → 9 everywhere; JSON {block name: k} (e.g. from ΔConv Attention Locality)."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DistillError(f"kernel_preset is neither a number nor JSON ({e}); leave it empty for the official "
                           "kernel sizes") from e
    if isinstance(value, int):
        return {s.name: value for s in sites}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {s.name for s in sites})
        if unknown:
            raise DistillError(f"kernel_preset names blocks this model does not have: {unknown[:3]}")
        return {k: int(v) for k, v in value.items()}
    raise DistillError("kernel_preset must be a number or a JSON object {block name: kernel size}")


def output_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), FOLDER)


class DeltaConvDistill:
    DESCRIPTION = ("Distils ΔConv blocks, or mediator attention, from the frozen model (teacher and student share "
                   "it). Stage A trains each block on recorded attention in/outputs (cheap); stage B trains "
                   "end-to-end on noise, teacher and "
                   "feature losses. Checkpoints go to output/deltaconv; connect a checkpoint as `deltaconv` to "
                   "resume or fine-tune. Interrupting stops cleanly and keeps what was learned.")
    CATEGORY = "ΔConv"
    RETURN_TYPES = ("DELTACONV", "LOSS_MAP", "STRING")
    RETURN_NAMES = ("deltaconv", "loss", "checkpoint")
    FUNCTION = "distill"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The teacher; its self-attention is what the blocks learn."}),
                "latents": ("LATENT", {"tooltip": "Training latents: VAE-encoded images, or the model's own "
                                                  "KSampler outputs for data-free distillation."}),
                "positive": ("CONDITIONING", {"tooltip": "One prompt for all latents, or one entry per latent."}),
                "stage": (list(STAGE_CHOICES),),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000,
                                  "tooltip": "Total optimiser steps (a resumed run continues up to this)."}),
                "learning_rate": ("FLOAT", {"default": 3e-4, "min": 1e-7, "max": 1.0, "step": 1e-5}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 1024}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
                "save_every": ("INT", {"default": 500, "min": 0, "max": 1_000_000,
                                       "tooltip": "Checkpoint interval in steps (0: only at the end)."}),
                "filename_prefix": ("STRING", {"default": "deltaconv_distilled"}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Empty/negative prompt used for caption drop (15%)."}),
                "deltaconv": ("DELTACONV", {"tooltip": "Blocks to start from: resume (same stage) or fine-tune."}),
                "warmup_steps": ("INT", {"default": 500, "min": 0, "max": 100_000}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024}),
                "training_dtype": (list(TRAINING_DTYPES), {"default": "bf16"}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Stage B: recompute the UNet's activations in "
                                                                  "backward to save memory."}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0,
                                            "tooltip": "Stage B loss weighting; 0 = off, 5 = the paper."}),
                "kernel_preset": ("STRING", {"default": "", "tooltip": "Empty: official kernel sizes; a number; "
                                                                       "or JSON {block name: kernel size}."}),
                "allow_cpu": ("BOOLEAN", {"default": False, "tooltip": "Train even when ComfyUI runs on the "
                                                                       "CPU (very slow)."}),
                "student": (list(STUDENT_CHOICES), {
                    "default": "ΔConv block",
                    "tooltip": "What replaces each self-attention layer. ΔConv block: convolutions (fastest, local). "
                               "Mediator attention: global attention through a few pooled mediator tokens, their "
                               "number following the noise level; starts from the model's own attention weights. "
                               "Ignored when deltaconv is connected (its students are trained)."}),
                "mediator_schedule": ("STRING", {
                    "default": "",
                    "tooltip": f"Mediator attention: how many mediators run when, as start:count pairs over "
                               f"sampling progress (0 = first step), e.g. '{EXAMPLE}' (the default when empty), or "
                               f"one count such as '16'. Every count is trained at the noise levels where it runs; "
                               f"the schedule is saved with the weights. Empty with deltaconv connected: its "
                               f"schedule."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def distill(self, model, latents, positive, stage, steps, learning_rate, batch_size, seed, save_every,
                filename_prefix, negative=None, deltaconv=None, warmup_steps=500, grad_accumulation=1,
                training_dtype="bf16", gradient_checkpointing=False, min_snr_gamma=0.0, kernel_preset="",
                allow_cpu=False, student="ΔConv block", mediator_schedule="", unique_id=None):
        if comfy.model_management.get_torch_device().type == "cpu" and not allow_cpu:
            raise DistillError("ComfyUI runs on the CPU here, where distillation is very slow. Start ComfyUI with "
                               "a GPU, or turn on allow_cpu to train anyway.")
        check_latents(model, latents["samples"])
        sites = find_attention_sites(model.model.diffusion_model)
        config = DistillConfig(stage=stage[0], steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                               seed=seed, warmup_steps=warmup_steps, grad_accumulation=grad_accumulation,
                               min_snr_gamma=min_snr_gamma, training_dtype=training_dtype,
                               gradient_checkpointing=gradient_checkpointing, save_every=save_every,
                               student=STUDENT_CHOICES[student], mediator_schedule=mediator_schedule)
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
            with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference mode
                result = train_blocks(model, latents["samples"], positive, negative, start, config, output_dir(),
                                      filename_prefix, should_stop=should_stop, on_step=on_step)
        except Interrupted as e:
            compat.send_progress_text(unique_id, f"cancelled; saved {e.checkpoint}")
            # The blocks are saved; now cancel like core nodes do: the flag consumed, nothing downstream runs.
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException() from None
        if result.skipped_steps:
            compat.send_progress_text(unique_id, f"{result.skipped_steps} of {steps} steps skipped: non-finite "
                                                 "gradients")
        return (result.weights, {"loss": result.losses, "skipped_steps": result.skipped_steps}, result.checkpoint)
