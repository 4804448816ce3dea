"""The quality proxy's smallest configuration (scripts/quality_proxy/), end to end, checking its own invariants.

Real photos (scikit-image's wheel), a real teacher trained for a few seconds, the pack's Distiller and wrappers.
Quality at this size means nothing; what must hold is that training learns, that the students are better than
removing the attention altogether, and that every model ran (and is costed) as its schedule says: the dynamic
mediator student at its counts per step, the hybrid on ΔConv and then on attention.
"""
import os

import pytest
import torch

from deltaconv_core.students import DELTACONV
from quality_proxy import data, report
from quality_proxy.experiment import PRESETS, run


@pytest.fixture(scope="module")
def result():
    try:
        data.wheel_path()
    except RuntimeError as e:  # offline and no wheel cached: only this benchmark's photos are missing
        pytest.skip(str(e))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and immune to a busy machine's oversubscription
    try:
        return run(PRESETS["smoke"], cache=None)
    finally:
        torch.set_num_threads(threads)


def test_training_learns(result):
    assert result["teacher_loss_end"] < 0.9 * result["teacher_loss_start"]
    (student,) = [m for n, m in result["models"].items() if n.startswith("ΔConv")]
    stage_a = student["losses"]["A"]
    assert sum(stage_a[-10:]) < 0.5 * sum(stage_a[:10])  # stage A: block outputs move towards attention's


@pytest.mark.parametrize("kind", ["deltaconv", "mediators"])
def test_student_beats_the_zero_block(result, kind):
    models = result["models"]
    (student,) = [m for m in models.values() if m["kind"] == kind]
    zero = models["zero block (attention removed)"]
    # σ = 1 is where attention matters most for this teacher; at tiny σ every model is near the identity.
    assert student["mse"][-1] < zero["mse"][-1]
    assert student["mse_ratio_mean"] < zero["mse_ratio_mean"]
    assert student["psnr"] > zero["psnr"]


def test_schedules_ran_and_are_costed(result):
    """(run() itself raises when the wrappers' calls differ from what the cost assumes.)"""
    models = result["models"]
    by_kind = {m["kind"]: m for m in models.values()}
    steps = result["config"]["sample_steps"]
    mediators, hybrid, delta = by_kind["mediators"], by_kind["hybrid"], by_kind["deltaconv"]
    assert len(mediators["calls"]) > 1 and sum(mediators["calls"].values()) == steps  # several counts, every step
    assert all(key.startswith("mediators:") for key in mediators["calls"])
    assert hybrid["calls"] == {"attention:sigma": steps - round(0.8 * steps), DELTACONV: round(0.8 * steps)}
    assert delta["macs_per_run"] < hybrid["macs_per_run"] < models["teacher"]["macs_per_run"]
    assert 0 < mediators["macs_per_run"] < models["teacher"]["macs_per_run"]


def test_locality_and_report(result, tmp_path):
    for site in result["sites"].values():
        assert 0 <= site["mass_in_kernel"] <= 1 + 1e-6 and site["kernel"] % 2 == 1 and site["kernel"] >= 3
    paths = report.save(result, str(tmp_path), "test", "CPU test", "pytest")
    assert all(os.path.getsize(p) > 0 for p in paths)
    with open(paths[1]) as f:
        md = f.read()
    assert "zero block" in md and "ΔConv (scales 1, ½ + pool)" in md
    assert "mediators dynamic" in md and "hybrid: ΔConv for" in md and "## Targets" in md
