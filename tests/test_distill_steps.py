"""The distillation engine's optimiser step on a toy one-site model: non-finite gradients are skipped, never
applied, and fp16 runs (loss scaling by torch's GradScaler, which works on the CPU too) resume exactly."""
import pytest
import torch
from torch import nn

from deltaconv_core.attention import TeacherSwitch
from deltaconv_core.block import BlockConfig
from deltaconv_core.distill import DistillConfig, Distiller
from deltaconv_core.students import build_student

DIM = 8


def toy_distiller(config: DistillConfig, block_state=None) -> Distiller:
    """One self-attention site on a 4×4 grid: a fixed linear map is the teacher's attention, a ΔConv block the
    student. Same seed, same start."""
    torch.manual_seed(0)
    attention = nn.Linear(DIM, DIM)
    block = build_student(BlockConfig(DIM, 3, (1.0, 0.5), "scaled"))
    if block_state is not None:
        block.load_state_dict(block_state)
    teacher = TeacherSwitch()

    def denoise(x_t, sigma, negative, index):
        b, c, h, w = x_t.shape
        tokens = x_t.flatten(2).transpose(1, 2)
        if teacher.on:
            out = teacher.run("site", attention, tokens, (h, w))
        else:
            out = block(tokens.reshape(b, h, w, c)).reshape(b, h * w, c)
        return (tokens + out).transpose(1, 2).reshape(b, c, h, w)

    latents = torch.randn(4, DIM, 4, 4, generator=torch.Generator().manual_seed(1))
    return Distiller(denoise, teacher, {"site": block}, latents, torch.linspace(0.1, 1.0, 20), config)


def poisoned_step(distiller: Distiller) -> float:
    """One step whose loss is finite but whose gradients are inf/NaN (as fp16 overflow in backward gives)."""
    handle = next(distiller.bank.parameters()).register_hook(lambda grad: grad * float("inf"))
    try:
        return distiller.step()
    finally:
        handle.remove()


def snapshot(distiller: Distiller) -> dict:
    tensors, _ = distiller.training_state()
    return {**{k: v.clone() for k, v in distiller.bank.state_dict().items()},
            **{k: v for k, v in tensors.items() if k != "rng"}}


def test_non_finite_gradients_skip_the_update_and_are_counted():
    distiller = toy_distiller(DistillConfig(steps=3, warmup_steps=0, learning_rate=1e-2))
    distiller.step()
    before = snapshot(distiller)
    loss = poisoned_step(distiller)
    assert torch.isfinite(torch.tensor(loss)) and distiller.state.skipped_steps == 1 and distiller.state.step == 2
    after = snapshot(distiller)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # weights, moments
    distiller.step()
    assert any(not torch.equal(after[k], v) for k, v in snapshot(distiller).items())  # training goes on
    assert distiller.training_state()[1]["skipped_steps"] == 1


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_resume_equals_uninterrupted(dtype):
    """6 steps in one run equal 3 + 3 resumed from the training state, bit for bit (weights, losses, scaler)."""
    config = DistillConfig(steps=6, warmup_steps=2, learning_rate=1e-2, training_dtype=dtype)
    full = toy_distiller(config)
    start = {k: v.clone() for k, v in full.bank.state_dict().items()}
    poisoned_step(full)
    while not full.finished:
        full.step()

    first = toy_distiller(config)
    poisoned_step(first)
    first.step()
    first.step()
    tensors, info = first.training_state()
    resumed = toy_distiller(config, {k: v.clone() for k, v in first.bank.students[0].state_dict().items()})
    resumed.load_training_state(tensors, info)
    while not resumed.finished:
        resumed.step()

    a, b = full.bank.state_dict(), resumed.bank.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert any(not torch.equal(a[k], start[k]) for k in a)  # some steps were applied
    assert full.state.losses == resumed.state.losses
    assert resumed.state.skipped_steps == full.state.skipped_steps < 6
    if dtype == "fp16":  # the scaler backed off at least at the poisoned step: not a fresh scaler's state
        assert info["grad_scaler"]["scale"] < 2.0 ** 16
        assert resumed.scaler.state_dict() == full.scaler.state_dict()
    else:
        assert full.scaler is None and "grad_scaler" not in info and full.state.skipped_steps == 1
