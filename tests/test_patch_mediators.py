"""Mediator-attention sites on a real ComfyUI ModelPatcher, in-process: the schedule per sigma, the same fallbacks,
reports and conflicts as ΔConv sites, mixed files and the Patch node's schedule override."""
import inspect

import pytest
import torch
from comfy.ldm.modules.attention import CrossAttention

from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import MediatorAttention
from deltaconv_core.weights import DeltaConvWeights

LEGACY = "transformer_options" not in inspect.signature(CrossAttention.forward).parameters
SCHEDULE = MediatorSchedule.parse("0.0:4,0.5:16,0.8:64")
SITE = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"


@pytest.fixture()
def sd15(load_tiny):
    return load_tiny("tiny_sd15")


def _sites(patching, model):
    return patching.find_attention_sites(model.model.diffusion_model)


def _mediators(patching, model, schedule=SCHEDULE, seed=0):
    """Mediator students from the model's attention, with a random DWC so that it matters."""
    weights = DeltaConvWeights.fresh_mediators(_sites(patching, model), model.model.diffusion_model, schedule)
    g = torch.Generator().manual_seed(seed)
    for _, state in weights.students.values():
        state["dwc.weight"] = torch.randn(state["dwc.weight"].shape, generator=g) * 0.1
    return weights


def _call(wrapper, x, context=None, value=None, **options):
    """Call a wrapper as this ComfyUI's BasicTransformerBlock would (older ones pass no transformer_options)."""
    with torch.no_grad():
        if LEGACY:
            wrapper.runtime.stashed_options = options
            return wrapper(x, context=context, value=value)
        return wrapper(x, context=context, value=value, transformer_options=options)


def test_count_follows_the_sigma_and_fallbacks_are_exact(patching, sd15):
    clone, _, runtime = patching.patch_model(sd15, _mediators(patching, sd15))
    wrapper = clone.object_patches[SITE]
    assert isinstance(wrapper.student, MediatorAttention) and wrapper.student_type == "mediators"
    sampling = patching.compat.model_sampling(sd15)
    x = torch.randn(2, 7 * 5, 320)
    with torch.no_grad():
        for percent, count in ((0.01, 4), (0.3, 4), (0.6, 16), (0.9, 64)):
            sigmas = torch.tensor([float(sampling.percent_to_sigma(percent))] * 2)
            out = _call(wrapper, x, activations_shape=[2, 320, 7, 5], sigmas=sigmas)
            assert torch.equal(out, wrapper.student(x.reshape(2, 7, 5, 320), count).reshape(2, 35, 320))
        # The same fallbacks as ΔConv sites, to the original attention exactly.
        merged = x[:, :20]
        assert torch.equal(_call(wrapper, merged, activations_shape=[2, 320, 7, 5]), wrapper.original(merged))
        ctx = torch.randn(2, 50, 320)
        got = _call(wrapper, x, context=ctx, value=ctx, activations_shape=[2, 320, 7, 5])
        assert torch.equal(got, wrapper.original(x, context=ctx, value=ctx))
    assert runtime.counts == {"mediators:4": 2, "mediators:16": 1, "mediators:64": 1,
                              "attention:tokens rearranged": 1, "attention:context": 1}


def test_sigma_range_and_forced_count(patching, sd15):
    clone, _, runtime = patching.patch_model(sd15, _mediators(patching, sd15), start_percent=0.5)
    wrapper = clone.object_patches[SITE]
    sampling = patching.compat.model_sampling(sd15)
    x = torch.randn(1, 16, 320)
    early = torch.tensor([float(sampling.percent_to_sigma(0.2))])
    with torch.no_grad():
        assert torch.equal(_call(wrapper, x, activations_shape=[1, 320, 4, 4], sigmas=early), wrapper.original(x))
        runtime.teacher.mediators = 9  # what distillation sets for a step; wins over the schedule
        late = torch.tensor([float(sampling.percent_to_sigma(0.6))])
        out = _call(wrapper, x, activations_shape=[1, 320, 4, 4], sigmas=late)
        assert torch.equal(out, wrapper.student(x.reshape(1, 4, 4, 320), 9).reshape(1, 16, 320))
    assert runtime.counts == {"attention:sigma": 1, "mediators:9": 1}


def test_report_names_the_student_and_the_schedule(patching, sd15):
    _, report, _ = patching.patch_model(sd15, _mediators(patching, sd15))
    assert "students: mediator attention at 7 sites" in report
    assert "7 mediator-attention sites, schedule 0.0:4,0.5:16,0.8:64" in report
    line = next(r for r in report.splitlines() if "mediator schedule" in r)
    assert line.startswith("  mediator schedule (from the weights, 7 sites): 0.0:4,0.5:16,0.8:64: 4 from σ 1e+09")
    assert ", 16 from σ " in line and ", 64 from σ " in line

    override = MediatorSchedule.fixed(8)
    clone, report, _ = patching.patch_model(sd15, _mediators(patching, sd15), mediator_schedule=override)
    assert "mediator schedule (set in ΔConv Patch, 7 sites): 0.0:8: 8 from σ" in report
    assert clone.object_patches[SITE].sigma_counts.counts == (8,)


def test_mixed_file_runs_each_student_at_its_sites(patching, sd15):
    sites = _sites(patching, sd15)
    weights = DeltaConvWeights.fresh(sites, seed=1)
    mediators = _mediators(patching, sd15)
    level0 = [s.name for s in sites.sites if s.level == 0]
    for name in level0:
        weights.students[name] = mediators.students[name]
    clone, report, _ = patching.patch_model(sd15, weights)
    kinds = {p.site: p.student_type for p in clone.object_patches.values()}
    assert kinds == {s.name: "mediators" if s.name in level0 else "deltaconv" for s in sites.sites}
    assert f"students: ΔConv block at {7 - len(level0)} sites, mediator attention at {len(level0)} sites" in report
    # A ΔConv-only file says nothing of mediators, and an override for it is reported as ignored.
    _, report, _ = patching.patch_model(sd15, DeltaConvWeights.fresh(sites, seed=1),
                                        mediator_schedule=MediatorSchedule.fixed(8))
    assert "students: ΔConv block at 7 sites" in report and "mediator schedule (" not in report
    assert "mediator_schedule is ignored: no patched site runs mediator attention" in report


def test_repatching_replaces_mediators_and_keeps_the_original(patching, sd15):
    first, _, _ = patching.patch_model(sd15, _mediators(patching, sd15))
    second, _, _ = patching.patch_model(first, DeltaConvWeights.fresh(_sites(patching, sd15), seed=2))
    original = sd15.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    assert second.object_patches[SITE].original is original and second.object_patches[SITE].student_type == "deltaconv"
    names = dict(first.object_patches[SITE].named_parameters())
    assert "to_q.weight" in names and "student.qkv.weight" in names  # the student's own copies of the projections


def test_lora_on_mediator_sites_is_reported(patching, sd15):
    lora = sd15.clone()
    lora.add_patches({f"{SITE}.to_q.weight": (torch.zeros(320, 320),)}, 1.0)
    _, report, _ = patching.patch_model(lora, _mediators(patching, sd15))
    assert "1 weight patches (LoRA/merges) touch replaced self-attention layers" in report
    assert "mediator attention use their own weights" in report


def test_students_follow_the_model_dtype(patching, tiny_models):
    import comfy.sd

    if not hasattr(comfy.sd, "load_diffusion_model"):
        pytest.skip("this ComfyUI's load_unet takes no dtype option")
    model = comfy.sd.load_diffusion_model(tiny_models["tiny_sd15"], model_options={"dtype": torch.bfloat16})
    clone, _, _ = patching.patch_model(model, _mediators(patching, model))
    wrapper = clone.object_patches[SITE]
    assert {p.dtype for p in wrapper.student.parameters()} == {torch.bfloat16}
    out = _call(wrapper, torch.randn(1, 16, 320), activations_shape=[1, 320, 4, 4], sigmas=torch.tensor([1.0]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # weights cast per call, like ΔConv blocks


@pytest.mark.parametrize("text, expected", [("", None), ("  ", None), ("16", (16,)), ("0:4, 0.5:32", (4, 32))])
def test_schedule_override_parsing(pack, text, expected):
    schedule = pack.nodes.validation.parse_mediator_schedule(text)
    assert (schedule and schedule.counts) == expected


@pytest.mark.parametrize("text, reason", [("0.2:4", "must start at 0.0"), ("0:4,0.5", "not start:count"),
                                          ("0:0", "whole number"), ("0:4,0.5:8,0.4:2", "increase strictly")])
def test_bad_schedule_override_says_how_to_write_one(pack, text, reason):
    with pytest.raises(ValueError, match=rf"mediator_schedule = '{text}'.*{reason}.*leave it empty"):
        pack.nodes.validation.parse_mediator_schedule(text)
