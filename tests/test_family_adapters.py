"""What every family adapter must provide (deltaconv_core/families/base.py), checked for each registered adapter on
its family's tiny model. A new family's adapter has to pass this file as it is; only its tiny model is new."""
import functools
import math

import pytest
import torch
from torch import nn

from deltaconv_core import attention
from deltaconv_core.block import BlockConfig
from deltaconv_core.families import (
    FAMILIES,
    GRID_UNKNOWN,
    TOKENS_REARRANGED,
    FamilyAdapter,
    family_of,
    find_attention_sites,
    official_family,
    teacher_projections,
)
from deltaconv_core.mediators import MediatorAttention
from devkit.tiny_models import TINY_MODELS, has_pixart, has_wan

ATTRIBUTES = ("key", "label", "gate", "wrapper", "attention", "tiny_model")
METHODS = ("detect", "find_sites", "kernel_size", "token_grid", "is_attention", "projection_weight",
           "teacher_projections", "queries_keys", "feature_tap_path", "checkpoint_blocks", "claims_official")
LATENT = (40, 32)  # non-square; halves cleanly, so every UNet level keeps the 5:4 aspect (and PixArt's patches too)
SKIP = {"tiny_pixart": (has_pixart, "this ComfyUI has no PixArt"), "tiny_wan": (has_wan, "this ComfyUI has no Wan")}


def test_the_interface_is_what_this_file_checks():
    assert FamilyAdapter.__abstractmethods__ == set(METHODS)
    assert set(ATTRIBUTES) <= set(FamilyAdapter.__annotations__)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_attributes(key):
    adapter = FAMILIES[key]
    assert isinstance(adapter, FamilyAdapter) and adapter.key == key
    assert all(isinstance(getattr(adapter, a), str) and getattr(adapter, a) for a in ATTRIBUTES)
    BlockConfig(16, 3, gate=adapter.gate, time_kernel=adapter.time_kernel)  # a gate and taps in time blocks have
    assert (adapter.time_kernel > 0) == (adapter.grid_dims == 3)  # ΔConv mixes time on video, and only there
    assert issubclass(getattr(attention, adapter.wrapper), nn.Module)
    assert adapter.tiny_model in TINY_MODELS
    assert adapter.grid_dims in (2, 3) and (TINY_MODELS[adapter.tiny_model].frames > 0) == (adapter.grid_dims == 3)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(adapter, its tiny model in eval mode, its sites)."""
    adapter = FAMILIES[request.param]
    available, why = SKIP.get(adapter.tiny_model, (lambda: True, ""))
    if not available():
        pytest.skip(why)
    model = TINY_MODELS[adapter.tiny_model].build(0).eval()
    return adapter, model, adapter.find_sites(model)


def test_detection_and_sites(family):
    adapter, model, sites = family
    assert [a.key for a in FAMILIES.values() if a.detect(model)] == [adapter.key]  # exactly one family says yes
    assert family_of(model) is adapter and find_attention_sites(model) == sites
    assert sites.family == adapter.key and sites.adapter is adapter and sites.sites
    assert sites.default_gate == adapter.gate
    assert len({s.path for s in sites.sites}) == len({s.name for s in sites.sites}) == len(sites.sites)
    for s in sites.sites:
        assert s.kernel_size == adapter.kernel_size(s.direction, s.level) and s.kernel_size % 2 == 1
    assert not adapter.detect(nn.Sequential(nn.Linear(4, 4)))


def test_each_site_module(family):
    adapter, model, sites = family
    in_blocks = {id(m) for block in adapter.checkpoint_blocks(model) for m in block.modules()}
    for s in sites.sites:
        module = model.get_submodule(s.path)
        assert adapter.is_attention(module) and id(module) in in_blocks
        weight = adapter.projection_weight(module)
        assert isinstance(weight, nn.Parameter) and weight.shape[1] == s.channels
        model.get_submodule(adapter.feature_tap_path(s.path))  # exists
        qkv, out, heads, norms = adapter.teacher_projections(module)
        assert sum(lin.out_features for lin in qkv) == 3 * s.channels and out.out_features == s.channels
        assert teacher_projections(module) == teacher_projections(module, adapter.key) == (qkv, out, heads, norms)
        assert norms is None or [n.weight.shape for n in norms] == [(s.channels,)] * 2
        x = torch.randn(5, s.channels)
        no_rotation = torch.eye(2).expand(1, 5, 1, s.channels // heads // 2, 2, 2)  # RoPE (Wan) at position 0
        q, k, map_heads = adapter.queries_keys(module, x, {"freqs": no_rotation})
        assert q.shape == k.shape == (5, s.channels) and map_heads == heads and s.channels % heads == 0
        student = MediatorAttention.from_teacher(module, family=adapter.key)
        assert student.config.dim == s.channels and student.config.heads == heads
        wrapper = getattr(attention, adapter.wrapper)
        made = wrapper.teacher_only(module, attention.PatchRuntime(), s.name,
                                    grid=functools.partial(adapter.token_grid, sites))
        assert isinstance(made, wrapper)
    assert not adapter.is_attention(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="is not"):
        adapter.teacher_projections(nn.Linear(4, 4))


def test_official_names(family):
    adapter, _, sites = family
    names = [s.name for s in sites.sites]
    claimed = [a.key for a in FAMILIES.values() if a.claims_official(names)]
    assert len(claimed) <= 1  # SD2.x and other UNets have no release: their names read as SD1.x's
    if adapter.claims_official(names):
        assert official_family(names) is adapter


def test_token_grid_on_the_model_calls(family, pack):
    adapter, model, sites = family
    if adapter.wrapper == "StudentSelfAttention" and pack.nodes.compat.LEGACY_ATTN1_CALL:
        pytest.skip("this ComfyUI calls attn1 without transformer_options (the stashed ones: test_patch_inprocess)")
    grids = []
    inputs = TINY_MODELS[adapter.tiny_model].inputs(LATENT)
    frames = TINY_MODELS[adapter.tiny_model].frames

    def record(module, args, kwargs):
        call = {**kwargs, "latent_shape": tuple(inputs["x"].shape)}  # what the wrappers add from the step
        grid = adapter.token_grid(sites, args[0].shape, call)  # now: ComfyUI reuses the options dict per call
        grids.append((args[0].shape[1], grid))
        grids.append((args[0].shape[1] // 2, adapter.token_grid(sites, (1, args[0].shape[1] // 2), call)))

    hooks = [model.get_submodule(s.path).register_forward_pre_hook(record, with_kwargs=True) for s in sites.sites]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(grids) == 2 * len(sites.sites)
    for tokens, grid in grids[::2]:  # the grid of the latent's aspect that holds the call's tokens (each frame's)
        if frames:
            assert len(grid) == 3 and grid[0] == frames, (tokens, grid)
            tokens, grid = tokens // frames, grid[1:]
        assert grid == (math.isqrt(tokens * 5 // 4), math.isqrt(tokens * 4 // 5)), (tokens, grid)
    assert {grid for _, grid in grids[1::2]} == {TOKENS_REARRANGED}  # half the tokens: merged (ToMe)
    assert adapter.token_grid(sites, (1, 80, sites.sites[0].channels), {}) == GRID_UNKNOWN
