"""One step state: a step's facts (students on or off, σ, each scheduled site's setting) are worked out once, before
the diffusion model runs, and every site reads them; under torch.compile the sites trace without graph breaks, the
graphs are reused from step to step, and the call counters still count."""
import inspect

import comfy.ldm.modules.attention
import pytest
import torch
from comfy.ldm.modules.attention import CrossAttention

from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.weights import DeltaConvWeights

LEGACY = "transformer_options" not in inspect.signature(CrossAttention.forward).parameters
SITE = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"
SHAPE = [1, 320, 7, 5]

pytestmark = pytest.mark.skipif(LEGACY, reason="this ComfyUI has no model wrappers: its sites read the sigmas")


class Untouchable:
    """Sigmas a site must not read inside a wrapped step (a read would break a torch.compile graph)."""

    def max(self):
        raise AssertionError("a site read the step's sigmas itself")


def patched(patching, model, student):
    sites = patching.find_attention_sites(model.model.diffusion_model)
    if student == "mediators":
        weights = DeltaConvWeights.fresh_mediators(sites, model.model.diffusion_model,
                                                   MediatorSchedule.parse("0.0:4,0.5:16"))
    else:
        weights = DeltaConvWeights.fresh(sites, seed=3)
    clone, _, runtime = patching.patch_model(model, weights, end_percent=0.7)
    return clone.object_patches[SITE], runtime, patching.compat.model_sampling(model)


def sigma_at(sampling, percent):
    return torch.tensor([float(sampling.percent_to_sigma(percent))])


@pytest.mark.parametrize("student", ["deltaconv", "mediators"])
def test_step_facts_are_worked_out_once_and_read_by_every_site(patching, load_tiny, student):
    wrapper, runtime, sampling = patched(patching, load_tiny("tiny_sd15"), student)
    x = torch.randn(1, 35, 320)
    with torch.no_grad():
        for percent, setting in ((0.2, 4), (0.6, 16), (0.9, None)):
            runtime.begin_step(sigma_at(sampling, percent))
            assert runtime.step.active == (percent <= 0.7)
            if student == "mediators":
                assert len(runtime.step.settings) == 7 and runtime.step.settings[wrapper.site] == (setting or 16)
            out = wrapper(x, transformer_options={"activations_shape": SHAPE, "sigmas": Untouchable()})
            runtime.end_step()
            if percent > 0.7:
                assert torch.equal(out, wrapper.original(x))
            else:
                assert torch.equal(out, wrapper.student.run(x, (7, 5), setting if student == "mediators" else None))
    key = {"deltaconv": ["deltaconv", "deltaconv"], "mediators": ["mediators:4", "mediators:16"]}[student]
    assert runtime.counts == {key[0]: 1 if student == "mediators" else 2, **({key[1]: 1} if student == "mediators"
                                                                            else {}), "attention:sigma": 1}


@pytest.mark.parametrize("student", ["deltaconv", "mediators"])
def test_compiled_site_has_no_graph_breaks_reuses_its_graphs_and_counts(patching, load_tiny, student, monkeypatch):
    # The fallback is ComfyUI's attention; its default on a CPU (sub-quadratic) asks psutil for free memory, which
    # breaks graphs by itself. PyTorch attention, as under --use-pytorch-cross-attention, traces whole.
    attention = comfy.ldm.modules.attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    wrapper, runtime, sampling = patched(patching, load_tiny("tiny_sd15"), student)
    options = {"activations_shape": SHAPE}
    x = torch.randn(1, 35, 320)
    runtime.begin_step(sigma_at(sampling, 0.2))
    explained = torch._dynamo.explain(lambda t: wrapper(t, transformer_options=options))(x)
    runtime.end_step()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    runtime.counts.clear()
    runtime.site_counts.clear()

    frames = []
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: wrapper(t, transformer_options=options), backend=backend)
    steps = (0.1, 0.2, 0.3, 0.6, 0.65, 0.9, 0.95)
    with torch.no_grad():
        for percent in steps:
            runtime.begin_step(sigma_at(sampling, percent))
            compiled(x)
            runtime.end_step()
    # One graph per distinct step state: on with 4 (or ΔConv), on with 16, off; never one per step.
    assert len(frames) == (3 if student == "mediators" else 2)
    on = sum(p <= 0.7 for p in steps)
    if student == "mediators":
        assert runtime.counts == {"mediators:4": 3, "mediators:16": 2, "attention:sigma": len(steps) - on}
    else:
        assert runtime.counts == {"deltaconv": on, "attention:sigma": len(steps) - on}
    assert runtime.site_counts == {wrapper.site: on}


def test_calls_outside_a_wrapped_step_are_counted_at_once(patching, load_tiny):
    wrapper, runtime, sampling = patched(patching, load_tiny("tiny_sd15"), "mediators")
    with torch.no_grad():
        wrapper(torch.randn(1, 35, 320), transformer_options={"activations_shape": SHAPE,
                                                              "sigmas": sigma_at(sampling, 0.6)})
        wrapper(torch.randn(1, 35, 320), transformer_options={"activations_shape": SHAPE})  # no sigma: the last
    assert runtime.counts == {"mediators:16": 2} and runtime.step is None
