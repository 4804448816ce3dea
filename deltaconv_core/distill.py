"""Distil students (ΔConvBlocks or MediatorAttention) from a frozen diffusion model (teacher and student share
one model in memory).

The engine works on any denoiser callable whose self-attention sites are ΔConv wrappers sharing one TeacherSwitch
(attention.py): `teacher.on = True` makes every site run its original attention (the teacher), False the blocks.

- Stage A (block-local): record each site's input and attention output from teacher forwards; train each block
  to reproduce that output (MSE). No backprop through the model: cheap, fits small GPUs.
- Stage B (end-to-end, the paper's recipe with the student prediction in the output losses):
  MSE(ε_student, ε) + MSE(ε_student, ε_teacher) + 0.001·Σ_sites MSE(residual stream after self-attention),
  optionally Min-SNR-γ weighted.

Mediator students train one count per step, every count of their schedule in turn (MediatorSchedule.training_count),
at the noise levels where the schedule runs that count; `TeacherSwitch.mediators` hands the count to the wrappers.

Noise follows ComfyUI's convention, x_t = a(σ)·x_0 + σ·ε with the model's signal scale a: 1 for ε- and
v-prediction models alike, 1 − σ for flow models such as Wan (the denoiser returns x̂_0, so ε̂ = (x_t − a·x̂_0)/σ).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import TeacherSwitch
from .mediator_schedule import MediatorSchedule, ScheduleError, SigmaCounts
from .quoting import quoted
from .students import DELTACONV, STUDENT_TYPES

STAGES = ("A", "B")
TRAINING_DTYPES = ("bf16", "fp16", "fp32")  # the forward passes' autocast dtype; fp32: no autocast


class DistillError(RuntimeError):
    pass


@dataclass
class DistillConfig:
    """Every setting of one distillation run: what the engine reads, and how the run around it saves and trains.

    The ΔConv Distill node and scripts/distill.py each fill one from their options (same names and values)."""
    stage: str = "A"
    steps: int = 1000  # total optimiser steps; a resumed run continues up to this
    learning_rate: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01  # linear weights only; biases and depthwise kernels get none
    warmup_steps: int = 500
    grad_clip: float = 1.0
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    caption_drop: float = 0.15  # fraction of samples trained with the negative/empty conditioning
    feature_weight: float = 1e-3
    min_snr_gamma: float = 0.0  # 0: off
    training_dtype: str = "fp32"  # one of TRAINING_DTYPES
    gradient_checkpointing: bool = False  # stage B: recompute the model's activations in backward (less memory)
    save_every: int = 0  # checkpoint interval in steps; 0: only at the end
    student: str = DELTACONV  # fresh students: one of STUDENT_TYPES ("deltaconv", "mediators")
    mediator_schedule: str = ""  # mediator students' schedule (text form); "": the weights' own, or the default

    def __post_init__(self):
        if self.stage not in STAGES:
            raise DistillError(f"stage must be one of {STAGES}, got {quoted(self.stage)}")
        if self.training_dtype not in TRAINING_DTYPES:
            raise DistillError(f"training_dtype must be one of {TRAINING_DTYPES}, got {quoted(self.training_dtype)}")
        if self.student not in STUDENT_TYPES:
            raise DistillError(f"student must be one of {STUDENT_TYPES}, got {quoted(self.student)}")
        if self.mediator_schedule.strip():
            try:
                MediatorSchedule.parse(self.mediator_schedule)
            except ScheduleError as e:
                raise DistillError(f"mediator_schedule = {quoted(self.mediator_schedule)}: {e}") from e
        for name in ("steps", "batch_size", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise DistillError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}


@dataclass
class Batch:
    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor  # [B]
    negative: torch.Tensor  # [B] bool: sample uses the negative conditioning (caption drop)
    index: torch.Tensor  # [B] which latent


@dataclass(frozen=True)
class Processes:
    """Data parallelism: this process's rank among `world`, and `ddp` wrapping a module for gradient all-reduce."""
    rank: int = 0
    world: int = 1
    ddp: Callable[[nn.Module], nn.Module] | None = None


ONE_PROCESS = Processes()


@dataclass(frozen=True)
class MediatorTraining:
    """How mediator students train: `schedule` says which counts (each in turn), `sigma_counts` (the same
    schedule on the model's sigmas) at which noise levels each count is trained: where sampling will run it."""
    schedule: MediatorSchedule
    sigma_counts: SigmaCounts


@dataclass
class TrainState:
    step: int = 0
    losses: list = field(default_factory=list)
    skipped_steps: int = 0  # steps whose update was skipped for non-finite gradients


class StudentBank(nn.Module):
    """All trainable blocks in one module: the optimiser's view and DistributedDataParallel's unit."""

    def __init__(self, blocks: dict[str, nn.Module]):
        super().__init__()
        self.names = list(blocks)
        self.students = nn.ModuleList(blocks[n] for n in self.names)

    def forward(self, compute):
        # DDP hooks gradient all-reduce onto the parameters used inside its forward; the loss is computed here.
        return compute()


def build_optimizer(bank: StudentBank, config: DistillConfig):
    decay = [p for n, p in bank.named_parameters() if n.endswith(".weight") and p.ndim == 2]
    ids = {id(p) for p in decay}
    rest = [p for p in bank.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.learning_rate, betas=config.betas)
    return opt


def gradients_finite(parameters) -> bool:
    grads = [p.grad for p in parameters if p.grad is not None]
    return bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True


def warmup_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


class Distiller:
    """One training run. `denoise(x_t, sigma, negative_mask, latent_index) -> x̂_0` runs the shared model, with
    `teacher` (a TeacherSwitch) choosing between its original attention and the blocks.

    blocks: site name → student (ΔConvBlock or MediatorAttention) inside the wrappers; taps: site name → module
    whose forward input is the residual stream right after that site's self-attention (stage B's feature loss);
    mediators: how mediator students train (required when some are among the blocks); signal_scale: σ → a(σ) of
    the model's noising x_t = a·x_0 + σ·ε (default 1: ε and v prediction; flow models 1 − σ).
    """

    def __init__(self, denoise, teacher, blocks: dict[str, nn.Module], latents: torch.Tensor,
                 sigma_table: torch.Tensor, config: DistillConfig, taps: dict[str, nn.Module] | None = None,
                 device=None, processes: Processes = ONE_PROCESS, mediators: MediatorTraining | None = None,
                 signal_scale: Callable[[torch.Tensor], torch.Tensor] = torch.ones_like):
        if not isinstance(teacher, TeacherSwitch):  # a PatchRuntime here would silently train against the student
            raise TypeError(f"teacher must be the wrappers' TeacherSwitch (runtime.teacher), not {type(teacher)}")
        if config.batch_size > latents.shape[0]:
            raise DistillError(f"batch_size {config.batch_size} is larger than the {latents.shape[0]} training "
                               "latents; lower batch_size or give more latents")
        rank, world = processes.rank, processes.world
        if config.batch_size % world:
            raise DistillError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
        self.denoise, self.teacher, self.config = denoise, teacher, config
        self.latents = latents
        self.sigma_table = sigma_table.detach().float().cpu()
        self.mediators = mediators
        self.signal_scale = signal_scale
        self.count_sigmas = self._count_sigmas(blocks)
        self.device = device or latents.device
        self.rank, self.world = rank, world
        self.bank = StudentBank(blocks)
        self.model = processes.ddp(self.bank) if processes.ddp is not None else self.bank
        self.optimizer = build_optimizer(self.bank, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.state = TrainState()
        self.taps = taps or {}
        self._tap_values: dict[str, torch.Tensor] = {}
        self._hooks = []
        # fp16 gradients need loss scaling wherever they are computed (torch's GradScaler runs on the CPU too).
        self.scaler = (torch.amp.GradScaler(torch.device(self.device).type) if config.training_dtype == "fp16"
                       else None)

    # ------------------------------------------------------------------------------------------------ data
    def _count_sigmas(self, blocks) -> dict[int, torch.Tensor]:
        """Mediator count → the model's sigmas at which the schedule runs it (empty without mediator students)."""
        if all(b.config.schedule is None for b in blocks.values()):
            return {}
        if self.mediators is None:
            raise DistillError("mediator students need their schedule to train (Distiller(mediators=...))")
        table = {}
        runs = torch.tensor([self.mediators.sigma_counts(float(s)) for s in self.sigma_table])
        for count in self.mediators.schedule.distinct_counts():
            table[count] = self.sigma_table[runs == count]
            if not len(table[count]):
                raise DistillError(f"mediator count {count} runs at none of the model's noise levels under the "
                                   f"schedule {self.mediators.schedule.format()!r}; widen its range")
        return table

    def step_mediators(self) -> int | None:
        """The mediator count this step trains (every count in turn, a pure function of step and seed)."""
        if not self.count_sigmas:
            return None
        return self.mediators.schedule.training_count(self.state.step, self.config.seed)

    def sample_batch(self, mediators: int | None = None) -> Batch:
        """The global batch from the shared generator (same on every rank); each rank keeps its own slice. With a
        mediator count, the noise levels are drawn from those where the schedule runs that count."""
        g, n = self.generator, self.config.batch_size
        index = torch.randint(self.latents.shape[0], (n,), generator=g)
        sigmas = self.sigma_table if mediators is None else self.count_sigmas[mediators]
        sigma = sigmas[torch.randint(len(sigmas), (n,), generator=g)]
        negative = torch.rand(n, generator=g) < self.config.caption_drop
        noise = torch.randn((n, *self.latents.shape[1:]), generator=g)
        part = slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)
        dev = self.device
        return Batch(self.latents[index[part].to(self.latents.device)].to(dev, torch.float32),
                     noise[part].to(dev), sigma[part].to(dev), negative[part].to(dev), index[part])

    # ---------------------------------------------------------------------------------------------- losses
    def _autocast(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.training_dtype)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=dtype)

    def _forward(self, batch: Batch, teacher: bool):
        sigma = batch.sigma.view(-1, *[1] * (batch.x0.ndim - 1))  # images [B, C, H, W], videos [B, C, T, H, W]
        scale = self.signal_scale(sigma)
        x_t = scale * batch.x0 + sigma * batch.noise
        self.teacher.on = teacher
        try:
            with self._autocast():
                x0_pred = self.denoise(x_t, batch.sigma, batch.negative, batch.index)
        finally:
            self.teacher.on = False
        if x0_pred.shape[1] == 2 * x_t.shape[1]:  # learned-variance outputs (PixArt): keep the mean channels
            x0_pred = x0_pred[:, : x_t.shape[1]]
        return (x_t - scale * x0_pred.float()) / sigma

    def _stage_a_loss(self, batch: Batch) -> torch.Tensor:
        self.teacher.recording = {}
        try:
            with torch.no_grad():
                self._forward(batch, teacher=True)
            recorded = self.teacher.recording
        finally:
            self.teacher.recording = None
        missing = [n for n in self.bank.names if n not in recorded]
        if missing:
            raise DistillError(f"no teacher activations were recorded for {missing[:3]}: another patch rearranges "
                               "their tokens; distill without it")

        def compute():
            total = 0.0
            with self._autocast():
                for name, student in zip(self.bank.names, self.bank.students):
                    x, grid, y, _ = recorded[name]
                    setting = self.teacher.mediators if student.config.schedule is not None else None
                    total = total + F.mse_loss(student.run(x, grid, setting).float(), y.float())
            return total

        return self.model(compute)

    def _hook(self, name):
        def store(module, args):
            self._tap_values[name] = args[0].clone()  # older ComfyUI adds to this tensor in place later
        return store

    def _stage_b_loss(self, batch: Batch) -> torch.Tensor:
        if not self._hooks:
            self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.taps.items()]
        with torch.no_grad():
            eps_teacher = self._forward(batch, teacher=True)
            feats_teacher = {k: v.detach() for k, v in self._tap_values.items()}
        self._tap_values = {}

        def compute():
            eps = self._forward(batch, teacher=False)
            per_sample = ((eps - batch.noise) ** 2 + (eps - eps_teacher) ** 2).flatten(1).mean(dim=1)
            if self.config.min_snr_gamma > 0:  # ε-prediction Min-SNR-γ: min(1, γ/SNR), SNR = a²/σ²
                inverse_snr = (batch.sigma / self.signal_scale(batch.sigma)) ** 2  # a = 0 (pure noise): inf → 1
                per_sample = per_sample * torch.clamp(self.config.min_snr_gamma * inverse_snr, max=1.0)
            feature = sum(F.mse_loss(self._tap_values[k].float(), feats_teacher[k].float()) for k in feats_teacher)
            self._tap_values = {}
            return per_sample.mean() + self.config.feature_weight * feature

        return self.model(compute)

    # ------------------------------------------------------------------------------------------------ step
    @property
    def finished(self) -> bool:
        return self.state.step >= self.config.steps

    def step(self) -> float:
        """One optimiser step (over grad_accumulation micro-batches); returns the mean loss.

        A finite loss can still give inf/NaN gradients (fp16/bf16 autocast overflowing in backward). Such a step
        is skipped, never applied: the blocks keep their weights, the optimiser its moments, the step counts in
        `state.skipped_steps` and training goes on (under fp16 the GradScaler lowers its scale, as it is made to).
        A non-finite loss stops the run instead (DistillError), as the data or settings are then at fault.
        """
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * warmup_factor(self.state.step, cfg.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        self.teacher.mediators = self.step_mediators()  # the students' count in stage A and B alike
        for _ in range(cfg.grad_accumulation):
            batch = self.sample_batch(self.teacher.mediators)
            loss = (self._stage_a_loss if cfg.stage == "A" else self._stage_b_loss)(batch)
            value = float(loss.detach())
            if self.world > 1:
                t = torch.tensor([value], device=self.device)
                torch.distributed.all_reduce(t)
                value = float(t) / self.world
            if not math.isfinite(value):
                raise DistillError(f"loss became {value} at step {self.state.step + 1}; the blocks keep their "
                                   "weights from the step before. Lower the learning rate, or train in fp32/bf16")
            scaled = loss / cfg.grad_accumulation
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += value / cfg.grad_accumulation
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if gradients_finite(self.bank.parameters()):  # the same on every rank: gradients are all-reduced
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.bank.parameters(), cfg.grad_clip)
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self.state.skipped_steps += 1
        if self.scaler:
            self.scaler.update()  # after an overflow: a lower scale for the next step
        self.state.step += 1
        self.state.losses.append(total)
        return total

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.teacher.on, self.teacher.recording, self.teacher.mediators = False, None, None

    # ---------------------------------------------------------------------------------------------- resume
    def training_state(self) -> tuple[dict, dict]:
        """(tensors, json-able info) that resume this run exactly."""
        tensors = {"rng": self.generator.get_state()}
        names = {id(p): n for n, p in self.bank.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    tensors[f"optim.{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        info = {"step": self.state.step, "losses": self.state.losses, "config": self.config.to_dict(),
                "block_names": self.bank.names, "skipped_steps": self.state.skipped_steps}
        if self.scaler:  # scale and growth tracker: JSON numbers, exact for floats and ints
            info["grad_scaler"] = self.scaler.state_dict()
        return tensors, info

    def load_training_state(self, tensors: dict, info: dict):
        if info.get("block_names") != self.bank.names:
            raise DistillError("the checkpoint was trained for other sites than this run; resume on the same model")
        params = dict(self.bank.named_parameters())
        moments = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                pname, _, slot = key[len("optim."):].rpartition(".")
                p = params.get(pname)
                if p is None or (slot != "step" and value.shape != p.shape):
                    raise DistillError(f"the checkpoint's optimiser state {quoted(key)} fits no parameter of its "
                                       "blocks: the training state is damaged; resume from an earlier checkpoint")
                moments.setdefault(p, {})[slot] = value.to(p.device) if slot != "step" else value
        try:
            self.generator.set_state(tensors["rng"])
        except RuntimeError as e:  # wrong length for this device's generator
            raise DistillError(f"the checkpoint's random-number state does not fit this run's generator "
                               f"({quoted(e)}); resume on the same device type, or from an earlier checkpoint") from e
        for p, state in moments.items():
            self.optimizer.state.setdefault(p, {}).update(state)
        self.state = TrainState(int(info["step"]), list(info.get("losses", [])), int(info.get("skipped_steps", 0)))
        if self.scaler and info.get("grad_scaler"):  # older checkpoints (and other dtypes) start a fresh scale
            self.scaler.load_state_dict(info["grad_scaler"])
