"""Wan 2.x in-process: the tiny model as ComfyUI loads it, its sites, and the wrapper of its self-attention call
(the grid from the step's latent, the fallbacks, exactly the original when it falls back). Through the server:
test_e2e_wan.py."""
import functools

import pytest
import torch

from deltaconv_core.attention import PatchRuntime, StudentWanAttention
from deltaconv_core.block import BlockConfig, DeltaConvBlock
from deltaconv_core.families import FAMILIES, find_attention_sites
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import MediatorAttention
from deltaconv_core.students import DELTACONV, build_student
from deltaconv_core.weights import DeltaConvWeights
from devkit.tiny_models import SITE_COUNTS, TINY_MODELS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
LATENT = (8, 12)  # latent h × w: tokens on a 3 × 4 × 6 grid with the tiny model's 3 frames


def test_comfyui_loads_the_tiny_model_as_wan(load_tiny):
    patcher = load_tiny("tiny_wan")
    assert type(patcher.model.model_config).__name__ == "WAN21_T2V"
    sites = find_attention_sites(patcher.model.diffusion_model)
    assert sites.family == "wan" and sites.adapter is FAMILIES["wan"] and sites.patch_size == (1, 2, 2)
    assert [s.path for s in sites.sites] == [f"blocks.{i}.self_attn" for i in range(SITE_COUNTS["tiny_wan"])]
    assert [s.name for s in sites.sites] == [f"blocks.{i}" for i in range(SITE_COUNTS["tiny_wan"])]
    assert sites.variant == "Wan 2.x T2V (2 self-attention sites)" and sites.levels() == [0]
    assert not sites.adapter.claims_official([s.name for s in sites.sites])


@pytest.fixture(scope="module")
def call():
    """The tiny model, its first site and that site's self-attention call (x, freqs, transformer_options)."""
    tiny = TINY_MODELS["tiny_wan"]
    model = tiny.build(0).eval()
    sites = find_attention_sites(model)
    original = model.get_submodule(sites.sites[0].path)
    seen = []
    hook = original.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    inputs = tiny.inputs(LATENT)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    (x, freqs), kwargs = seen[0]
    return sites, original, x, freqs, kwargs["transformer_options"], tuple(inputs["x"].shape)


def make_wrapper(call, teacher_only=False):
    sites, original, *_ = call
    runtime = PatchRuntime()
    grid = functools.partial(sites.adapter.token_grid, sites)
    if teacher_only:
        return StudentWanAttention.teacher_only(original, runtime, sites.sites[0].name, grid=grid), runtime
    student = MediatorAttention.initial(sites.sites[0], original, sites)
    counts = MediatorSchedule.parse("0.0:8").resolve(lambda p: 1.0 - p)
    return StudentWanAttention(original, student, runtime, sites.sites[0].name, counts, grid=grid), runtime


def test_student_runs_on_the_step_latent_grid(call):
    _, original, x, freqs, options, latent = call
    wrapper, runtime = make_wrapper(call)
    with torch.no_grad():
        runtime.begin_step(None, latent)
        out = wrapper(x, freqs, options)
        runtime.end_step()
        assert torch.equal(out, wrapper.student.run(x, (3, 4, 6), 8))
        assert not torch.allclose(out, original(x, freqs, options))
    assert runtime.counts == {"mediators:8": 1}
    names = {k.split(".")[0] for k in wrapper.state_dict()}  # the original's modules under their own names
    assert names == {"q", "k", "v", "o", "norm_q", "norm_k", "student"}


@pytest.mark.parametrize("latent,reason", [
    (None, "grid unknown"),  # outside a wrapped step: nothing says where the grid is
    ((1, 16, 4, 8, 12), "tokens rearranged"),  # a frame more than the tokens hold (e.g. a reference latent)
    ((1, 16, 3, 8, 12, 1), "grid unknown"),  # not a video latent
])
def test_falls_back_to_exactly_the_original(call, latent, reason):
    _, original, x, freqs, options, _ = call
    wrapper, runtime = make_wrapper(call)
    with torch.no_grad():
        runtime.begin_step(None, latent)
        out = wrapper(x, freqs, options)
        runtime.end_step()
        assert torch.equal(out, original(x, freqs, options))
    assert runtime.counts == {f"attention:{reason}": 1}


def test_teacher_only_and_teacher_switch_run_the_original(call):
    _, original, x, freqs, options, latent = call
    expected = original(x, freqs, options)
    teacher, runtime = make_wrapper(call, teacher_only=True)
    wrapper, switched = make_wrapper(call)
    switched.teacher.on, switched.teacher.recording = True, {}
    with torch.no_grad():
        for w, r in ((teacher, runtime), (wrapper, switched)):
            r.begin_step(None, latent)
            assert torch.equal(w(x, freqs, options), expected)
            r.end_step()
    assert switched.teacher.recording[wrapper.site][1] == (3, 4, 6)  # what stage A would train on


def test_fresh_deltaconv_blocks_are_video_blocks(call):
    """Both constructors give the family's 3-D block: 3 taps in time, conv_time zero, the DiT gate."""
    sites, original = call[:2]
    model = TINY_MODELS["tiny_wan"].build(0)
    expected = BlockConfig(256, 7, gate="sigmoid", time_kernel=3)
    for weights in (DeltaConvWeights.fresh(sites), DeltaConvWeights.fresh_students(DELTACONV, sites, model)):
        assert [cfg for cfg, _ in weights.students.values()] == [expected] * SITE_COUNTS["tiny_wan"]
        assert all(torch.equal(state["conv_time.weight"], torch.zeros(3, 128)) for _, state in
                   weights.students.values())
    assert DeltaConvBlock.initial(sites.sites[0], original, sites).config == expected


def test_deltaconv_block_runs_on_the_step_latent_grid(call):
    sites, original, x, freqs, options, latent = call
    config = BlockConfig(256, 7, gate="sigmoid", time_kernel=3)
    student = build_student(config)
    with torch.no_grad():
        student.conv_time.weight.normal_()  # so that time matters
    runtime = PatchRuntime()
    wrapper = StudentWanAttention(original, student, runtime, sites.sites[0].name,
                                  grid=functools.partial(sites.adapter.token_grid, sites))
    with torch.no_grad():
        runtime.begin_step(None, latent)
        out = wrapper(x, freqs, options)
        runtime.end_step()
        assert torch.equal(out, student(x.view(1, 3, 4, 6, 256)).view(x.shape))
    assert runtime.counts == {"deltaconv": 1}


def test_compiled_site_has_no_graph_breaks_and_one_graph_per_step_state(patching, load_tiny, monkeypatch):
    """As the image sites (test_step_state.py): the step's facts, the latent's shape included, are read without
    graph breaks, and a compiled site recompiles only when the step state changes."""
    import comfy.ldm.modules.attention
    import comfy.ldm.wan.model

    # The fallback's attention as under --use-pytorch-cross-attention (the CPU default asks psutil: a graph break).
    monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    model = load_tiny("tiny_wan")
    diffusion_model = model.model.diffusion_model
    sites = find_attention_sites(diffusion_model)
    weights = DeltaConvWeights.fresh_mediators(sites, diffusion_model, MediatorSchedule.parse("0.0:4,0.5:16"))
    clone, _, runtime = patching.patch_model(model, weights, end_percent=0.7)
    wrapper = clone.object_patches["diffusion_model." + sites.sites[0].path]
    sampling = patching.compat.model_sampling(model)
    x = torch.randn(1, 3 * 4 * 6, 256)
    freqs = diffusion_model.rope_encode(3, *LATENT, device=x.device, dtype=x.dtype)

    def step(percent):
        runtime.begin_step(torch.tensor([float(sampling.percent_to_sigma(percent))]), (1, 16, 3, *LATENT))

    step(0.2)
    explained = torch._dynamo.explain(lambda t: wrapper(t, freqs, {}))(x)
    runtime.end_step()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    runtime.counts.clear()

    frames = []
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: wrapper(t, freqs, {}), backend=backend)
    with torch.no_grad():
        for percent in (0.1, 0.2, 0.6, 0.65, 0.9, 0.95):
            step(percent)
            compiled(x)
            runtime.end_step()
    assert len(frames) == 3  # on with 4, on with 16, off
    assert runtime.counts == {"mediators:4": 2, "mediators:16": 2, "attention:sigma": 2}


def test_compiled_deltaconv_site_has_no_graph_breaks(patching, load_tiny, monkeypatch):
    """The 3-D ΔConv block (conv over time, per-frame pyramid, clip-wide pool) compiles as one graph too."""
    import comfy.ldm.modules.attention
    import comfy.ldm.wan.model

    monkeypatch.setattr(comfy.ldm.wan.model, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    model = load_tiny("tiny_wan")
    diffusion_model = model.model.diffusion_model
    sites = find_attention_sites(diffusion_model)
    clone, _, runtime = patching.patch_model(model, DeltaConvWeights.fresh(sites, seed=1))
    wrapper = clone.object_patches["diffusion_model." + sites.sites[0].path]
    x = torch.randn(1, 3 * 4 * 6, 256)
    freqs = diffusion_model.rope_encode(3, *LATENT, device=x.device, dtype=x.dtype)
    torch._dynamo.reset()
    runtime.begin_step(torch.tensor([0.5]), (1, 16, 3, *LATENT))
    explained = torch._dynamo.explain(lambda t: wrapper(t, freqs, {}))(x)
    runtime.end_step()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert runtime.counts == {"deltaconv": 1}
