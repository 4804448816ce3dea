"""ΔConv Distill on the tiny SD1.5 model: skipped (non-finite gradient) steps are reported, and the out-of-memory
message of a resumed run names its checkpoint. The step itself is tested on a toy model in test_distill_steps.py."""
import glob
import re

import pytest
import torch
from test_distill_node import _tensors, data, run, sd15  # noqa: F401 (fixtures)

from deltaconv_core import distill as engine
from deltaconv_core.distill import DistillError
from deltaconv_core.weights import load_weights, read_training_state


def inject_inf_gradient(monkeypatch, at_steps):
    """Make the listed steps' gradients inf/NaN while their loss stays finite (a hook on one block parameter)."""
    real_step = engine.Distiller.step

    def step(self):
        if self.state.step + 1 not in at_steps:
            return real_step(self)
        handle = next(self.bank.parameters()).register_hook(lambda grad: grad * float("inf"))
        try:
            return real_step(self)
        finally:
            handle.remove()

    monkeypatch.setattr(engine.Distiller, "step", step)


def checkpoints(out_dir):
    return sorted(glob.glob(str(out_dir / "**" / "*.safetensors"), recursive=True))


def test_skipped_steps_are_reported_and_oom_after_resume_names_the_checkpoint(pack, sd15, data, out_dir,  # noqa: F811
                                                                             monkeypatch):
    inject_inf_gradient(monkeypatch, {2})
    weights, loss, path = run(pack, sd15, data, steps=2, save_every=1)
    assert loss["skipped_steps"] == 1 and all(map(torch.isfinite, torch.tensor(loss["loss"])))
    step1, step2 = (_tensors(load_weights(p)) for p in checkpoints(out_dir))
    assert all(torch.equal(step1[k], step2[k]) for k in step1)  # step 2's update was skipped, not applied
    assert read_training_state(path)[1]["skipped_steps"] == 1 and weights.training["skipped_steps"] == 1
    assert load_weights(path).site_fingerprints.keys() == weights.students.keys()  # for ΔConv Patch to compare

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.Distiller, "step", out_of_memory)
    with pytest.raises(DistillError, match=f"Last checkpoint: {re.escape(path)} \\(intact\\)"):
        run(pack, sd15, data, steps=4, deltaconv=load_weights(path))
