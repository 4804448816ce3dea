"""One distillation run on a ComfyUI model, shared by the ΔConv Distill node and the headless CLI."""
import logging
import os
import time
from dataclasses import dataclass, replace

import comfy.model_management
import torch

from ..deltaconv_core.distill import ONE_PROCESS, DistillConfig, Distiller, DistillError, MediatorTraining, Processes
from ..deltaconv_core.families import find_attention_sites
from ..deltaconv_core.fingerprint import site_fingerprint
from ..deltaconv_core.mediator_schedule import MediatorSchedule
from ..deltaconv_core.quoting import quoted
from ..deltaconv_core.students import STUDENTS, check_grid
from ..deltaconv_core.weights import DeltaConvWeights, read_training_state, save_weights
from . import compat
from .comfy_denoiser import ComfyDenoiser, sigma_table, signal_scale
from .patching import patch_model
from .training_model import feature_taps, gradient_checkpointing, make_backprop_safe, trainable_students
from .wrappers import original_attention

log = logging.getLogger("deltaconv")


@dataclass
class RunResult:
    weights: DeltaConvWeights
    losses: list
    checkpoint: str | None
    skipped_steps: int = 0  # updates skipped for non-finite gradients (Distiller.step)


class Interrupted(Exception):
    """Raised by a should_stop/on_step callback to cancel the run. train_blocks saves the blocks, then raises it
    again with `checkpoint` set to the saved file (None on ranks other than 0)."""

    def __init__(self, checkpoint: str | None = None):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint


def check_latents(model, x0: torch.Tensor):
    """Image models take [N, C, H, W] latents, video models (grids in time: Wan) [N, C, T, H, W]."""
    want = compat.latent_channels(model)
    video = find_attention_sites(model.model.diffusion_model).adapter.grid_dims == 3
    if x0.ndim != (5 if video else 4) or x0.shape[1] != want:
        shape, what = ("[N, C, T, H, W]", "videos") if video else ("[N, C, H, W]", "images")
        raise DistillError(f"latents have shape {list(x0.shape)}, but this model takes {want}-channel latents "
                           f"{shape}: encode the {what} with this model's VAE (or sample them with this model)")


def model_fingerprints(model, sites) -> dict[str, str]:
    """Each site's base-model fingerprint, stored with the blocks; ΔConv Patch compares them (conflicts.py)."""
    prints = {s.name: site_fingerprint(sites.adapter.projection_weight(original_attention(model, sites, s)))
              for s in sites.sites}
    return {name: fingerprint for name, fingerprint in prints.items() if fingerprint is not None}


def chosen_schedule(config: DistillConfig) -> MediatorSchedule | None:
    return MediatorSchedule.parse(config.mediator_schedule) if config.mediator_schedule.strip() else None


def fresh_students(model, config: DistillConfig, kernel_sizes: dict | None = None) -> DeltaConvWeights:
    """New students for every site, as config.student says: seeded ΔConv blocks (official kernel sizes unless
    `kernel_sizes`), or mediator attention initialised from the model's own attention projections."""
    diffusion_model = model.model.diffusion_model
    sites = find_attention_sites(diffusion_model)
    try:
        check_grid(STUDENTS[config.student], sites)
    except ValueError as e:  # a student the family's token grids do not take: name the setting that fixes it
        raise DistillError(f"student = {quoted(config.student)}: {e}; set student to one of those") from e
    with torch.inference_mode(False):  # trainable copies of the projections; ComfyUI runs nodes in inference mode
        return DeltaConvWeights.fresh_students(config.student, sites, diffusion_model, config.seed, kernel_sizes,
                                               chosen_schedule(config))


def mediator_training(start: DeltaConvWeights, config: DistillConfig, model) -> MediatorTraining | None:
    """How `start`'s mediator students train (None without any): on config's schedule when set, which is then
    stored with them, else on the one they have."""
    schedules = {cfg.schedule for cfg, _ in start.students.values() if cfg.schedule is not None}
    if not schedules:
        return None
    schedule = chosen_schedule(config)
    if schedule is None and len(schedules) > 1:
        raise DistillError(f"the mediator sites of {os.path.basename(start.source)} have different schedules "
                           f"({', '.join(sorted(s.format() for s in schedules))}); set mediator_schedule to train "
                           "them on one")
    schedule = schedule or schedules.pop()
    return MediatorTraining(schedule, schedule.resolve(compat.model_sampling(model).percent_to_sigma))


def trained_config(config, training: MediatorTraining | None):
    """A site's config as saved after training: students with a schedule get the one they trained on."""
    if config.schedule is not None:
        return replace(config, schedule=training.schedule)
    return config


def save_or_rescue(weights: DeltaConvWeights, path: str, training_tensors: dict) -> str:
    """Write a checkpoint; when the file system refuses its name (too long, not representable, …), write it under
    a short name in the same folder and log where: a save at the end of training must not lose the training."""
    try:
        return save_weights(weights, path, overwrite=True, training_tensors=training_tensors)
    except OSError as e:
        stage, step = weights.training.get("config", {}).get("stage", "X"), weights.training.get("step", 0)
        rescue = os.path.join(os.path.dirname(path), f"deltaconv_rescued_{stage}_{step:07d}_{time.time_ns()}"
                                                     ".safetensors")
        saved = save_weights(weights, rescue, training_tensors=training_tensors)
        log.warning("ΔConv Distill: could not write %s (%s); the blocks are saved as %s instead (it resumes the "
                    "run like the checkpoint would)", quoted(path), quoted(e.strerror or e), saved)
        return saved


def train_blocks(model, x0, positive, negative, start: DeltaConvWeights, config: DistillConfig, save_dir: str,
                 prefix: str, *, should_stop=None, on_step=None, processes: Processes = ONE_PROCESS) -> RunResult:
    """Train `start`'s blocks on `model` (raw VAE latents x0, CONDITIONING) up to `config.steps`.

    Checkpoints are written by rank 0 as `<save_dir>/<prefix>_<stage>_<step>.safetensors`. Must run with
    inference mode off and grad on. Resumes when `start` is a checkpoint of the same stage. Without a negative
    conditioning there is nothing to drop captions to, so caption_drop is 0.
    """
    check_latents(model, x0)
    if not negative:
        config = replace(config, caption_drop=0.0)
    sites = find_attention_sites(model.model.diffusion_model)
    fingerprints = model_fingerprints(model, sites)
    mediators = mediator_training(start, config, model)
    patched, _, runtime = patch_model(model, start, block_dtype=torch.float32,  # training runs the students
                                      mediator_schedule=mediators and mediators.schedule, speed_policy="always")
    compat.load_for_training(patched)
    device = comfy.model_management.get_torch_device()
    if config.stage == "B":
        make_backprop_safe(patched.model.diffusion_model)
    blocks = trainable_students(patched, sites.sites)
    for block in blocks.values():
        block.requires_grad_(True)
    latents = patched.model.process_latent_in(x0.to(device))  # LATENTs hold raw VAE output
    denoiser = ComfyDenoiser(patched, positive, negative, latents)
    distiller = Distiller(denoiser, runtime.teacher, blocks, latents, sigma_table(patched), config,
                          taps=feature_taps(patched, sites) if config.stage == "B" else None,
                          device=device, processes=processes, mediators=mediators, signal_scale=signal_scale(patched))
    resumed = read_training_state(start.source) if os.path.isfile(start.source) else None
    last_saved = None
    if resumed and resumed[1].get("config", {}).get("stage") == config.stage:
        distiller.load_training_state(*resumed)
        last_saved = start.source
        log.info("ΔConv Distill: resuming %s at step %d", quoted(start.source), distiller.state.step)

    def snapshot() -> DeltaConvWeights:
        tensors = {n: {k: v.detach().cpu().clone() for k, v in blocks[n].state_dict().items()} for n in blocks}
        configs = {n: trained_config(start.students[n][0], mediators) for n in blocks}
        return DeltaConvWeights(sites.family, {n: (configs[n], tensors[n]) for n in blocks}, source=prefix,
                                site_fingerprints={n: fingerprints[n] for n in blocks if n in fingerprints})

    def save_checkpoint() -> str | None:
        if processes.rank != 0:
            return None
        tensors, info = distiller.training_state()
        weights = snapshot()
        weights.training = info
        path = os.path.join(save_dir, f"{prefix}_{config.stage}_{distiller.state.step:07d}.safetensors")
        return save_or_rescue(weights, path, tensors)

    cancelled = False
    try:
        with gradient_checkpointing(patched, sites, config.gradient_checkpointing and config.stage == "B"):
            while not distiller.finished:
                if should_stop is not None and should_stop():
                    raise Interrupted
                skipped = distiller.state.skipped_steps
                loss = distiller.step()
                if distiller.state.skipped_steps > skipped:
                    log.warning("ΔConv Distill: step %d had non-finite gradients; its update was skipped (%d so "
                                "far)", distiller.state.step, distiller.state.skipped_steps)
                if on_step is not None:
                    on_step(distiller.state.step, loss)
                if config.save_every and distiller.state.step % config.save_every == 0 and not distiller.finished:
                    last_saved = save_checkpoint()
    except Interrupted:
        cancelled = True
    except DistillError as e:
        path = save_checkpoint() if distiller.state.step else None
        raise DistillError(f"{e}. {'Last good blocks saved to ' + path if path else 'Nothing was saved.'}") from e
    except compat.OUT_OF_MEMORY as e:
        raise DistillError("out of memory while distilling: lower batch_size (and raise grad_accumulation), turn "
                           "on gradient_checkpointing, or use stage A, which needs far less memory. Last "
                           f"checkpoint: {last_saved or 'none yet'} (intact).") from e
    except RuntimeError as e:
        if not compat.is_inplace_residual_error(e):
            raise
        raise DistillError("stage B cannot backpropagate through this ComfyUI's transformer blocks (they add "
                           "residuals in place, as ComfyUI did before mid-2024): update ComfyUI, or use stage A, "
                           "which needs no backprop through the model") from e
    finally:
        distiller.close()
        comfy.model_management.soft_empty_cache()
    path = save_checkpoint()
    if cancelled:
        if path:
            log.info("ΔConv Distill: cancelled at step %d; checkpoint saved to %s (connect it as deltaconv to "
                     "resume)", distiller.state.step, path)
        raise Interrupted(path)
    if distiller.state.skipped_steps:
        log.warning("ΔConv Distill: %d of %d steps were skipped for non-finite gradients",
                    distiller.state.skipped_steps, distiller.state.step)
    weights = snapshot()
    weights.source = path or prefix
    weights.training = {"step": distiller.state.step, "stage": config.stage,
                        "skipped_steps": distiller.state.skipped_steps}
    return RunResult(weights, list(distiller.state.losses), path, distiller.state.skipped_steps)

