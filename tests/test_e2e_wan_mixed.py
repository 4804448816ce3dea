"""Wan 2.x through a real ComfyUI server: a mixed weights file (a 3-D ΔConv block at one DiT block, mediator
attention at the other) through ΔConv Load → ΔConv Patch → KSampler, and ΔConv Patch's report on Wan, line by line:
sites, students, their kinds, the sampling range, the schedule in sigmas of this model, missing and unused blocks."""
import os

import pytest
from graphs import digest, txt2img

from deltaconv_core.mediators import DEFAULT_SCHEDULE
from deltaconv_core.weights import load_weights, save_weights
from devkit.tiny_models import SITE_COUNTS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
STEPS = 3
SITES = SITE_COUNTS["tiny_wan"]
MIXED = "tiny_wan_mixed.safetensors"
PARTIAL = "tiny_wan_partial.safetensors"
UNUSED = "tiny_wan_unused.safetensors"


@pytest.fixture(scope="module")
def files(server, tiny_models):
    """The mixed file (blocks.0: tiny_wan_random's ΔConv block; blocks.1: tiny_wan_mediators' mediator attention),
    a file with only blocks.0, and one with a block for a DiT block this model lacks, beside ΔConv Load's others."""
    folder = os.path.join(server.base, "models", "deltaconv")
    deltaconv, mediators = (load_weights(tiny_models[f"tiny_wan_{kind}"]) for kind in ("random", "mediators"))
    mixed = load_weights(tiny_models["tiny_wan_random"])
    mixed.students["blocks.1"] = mediators.students["blocks.1"]
    save_weights(mixed, os.path.join(folder, MIXED), overwrite=True)
    partial = load_weights(tiny_models["tiny_wan_random"])
    del partial.students["blocks.1"]
    save_weights(partial, os.path.join(folder, PARTIAL), overwrite=True)
    unused = load_weights(tiny_models["tiny_wan_random"])
    unused.students["blocks.7"] = deltaconv.students["blocks.1"]
    save_weights(unused, os.path.join(folder, UNUSED), overwrite=True)
    return deltaconv, mediators


def run_with_report(server, unet_inputs, weights, seed=5, **patch_inputs):
    g = txt2img("wan", weights, seed=seed, steps=STEPS, unet_inputs=unet_inputs)
    g["patch"]["inputs"].update(patch_inputs)
    g["report"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["patch", 1]}}
    entry = server.run(g)
    return digest(entry), entry["outputs"]["report"]["text"][0]


def schedule_sigmas(load_tiny):
    """Where each count of the default schedule starts on the tiny Wan model, as the report prints it."""
    sampling = load_tiny("tiny_wan").get_model_object("model_sampling")
    return ", ".join(f"{count} from σ {float(sampling.percent_to_sigma(start)):.3g}"
                     for start, _, count in DEFAULT_SCHEDULE.segments())


def test_mixed_file_runs_each_student_at_its_site(server, unet_inputs, files, load_tiny):
    d, report = run_with_report(server, unet_inputs, MIXED)
    pure = {kind: run_with_report(server, unet_inputs, f"tiny_wan_{kind}.safetensors")[0]
            for kind in ("random", "mediators")}
    assert d["shape"] == [1, 16, 3, 8, 12] and d["finite"] and d["mean_abs"] > 0
    assert d["patched_sites"] == SITES and d["sites"] == {f"blocks.{i}": STEPS for i in range(SITES)}
    assert d["counts"].pop("deltaconv") == STEPS, d["counts"]  # one ΔConv site, every step
    mediator_steps = pure["mediators"]["counts"]
    assert {k: v * SITES for k, v in d["counts"].items()} == mediator_steps  # one mediator site, its schedule
    assert d["sha256"] not in (pure["random"]["sha256"], pure["mediators"]["sha256"])

    lines = report.splitlines()
    assert lines[0] == f"ΔConv patch: {SITES} of {SITES} self-attention sites replaced (Wan 2.x T2V ({SITES} " \
                       "self-attention sites))", report
    assert lines[1] == "  students: ΔConv block at 1 sites, mediator attention at 1 sites", report
    assert lines[2].startswith(f"  weights: {MIXED}: Wan 2.x (deltaconv v"), report
    scales = len(files[0].students["blocks.0"][0].scales)
    assert lines[2].endswith(f"format): 1 ΔConv blocks, kernels [7], {scales} scales, 3 taps in time; 1 "
                             f"mediator-attention sites, schedule {DEFAULT_SCHEDULE.format()}"), report
    assert lines[3] == "  active from 0% to 100% of sampling; levels: all", report
    assert lines[4].startswith("  speed policy: auto: "), report
    assert lines[5] == (f"  mediator schedule (from the weights, 1 sites): {DEFAULT_SCHEDULE.format()}: "
                        f"{schedule_sigmas(load_tiny)}"), report
    assert len(lines) == 6, report  # nothing missing, unused or conflicting


def test_report_of_pure_files(server, unet_inputs, files):
    for kind, students, describe in (
            ("random", "ΔConv block", f"{SITES} ΔConv blocks, kernels [7], "
                                      f"{len(files[0].students['blocks.0'][0].scales)} scales, 3 taps in time"),
            ("mediators", "mediator attention", f"{SITES} mediator-attention sites, schedule "
                                                f"{DEFAULT_SCHEDULE.format()}")):
        _, report = run_with_report(server, unet_inputs, f"tiny_wan_{kind}.safetensors")
        assert f"  students: {students} at {SITES} sites\n" in report, report
        assert f"format): {describe}\n" in report, report
        assert ("mediator schedule" in report) == (kind == "mediators"), report


def test_report_names_missing_and_unused_blocks(server, unet_inputs, files):
    d, report = run_with_report(server, unet_inputs, PARTIAL, end_percent=0.5)
    ran = d["counts"]["deltaconv"]  # the steps inside 0-50 %; the others on attention, blocks.1 never patched
    assert d["patched_sites"] == 1 and d["sites"] == {"blocks.0": ran}
    assert 0 < ran < STEPS and d["counts"] == {"deltaconv": ran, "attention:sigma": STEPS - ran}, d["counts"]
    assert report.startswith(f"ΔConv patch: 1 of {SITES} self-attention sites replaced"), report
    assert "  active from 0% to 50% of sampling; levels: all" in report, report
    assert "  1 sites have no block in the file and keep attention: blocks.1" in report, report

    d, report = run_with_report(server, unet_inputs, UNUSED)
    assert d["patched_sites"] == SITES and d["counts"] == {"deltaconv": SITES * STEPS}
    assert "  1 blocks in the file have no site in this model (unused)" in report, report
