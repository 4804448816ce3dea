"""The patch logic on a real ComfyUI ModelPatcher, in-process: isolation, fallbacks, reports, casting."""
import inspect

import pytest
import torch
from comfy.ldm.modules.attention import CrossAttention

from deltaconv_core.families.unet import infer_grid
from deltaconv_core.weights import DeltaConvWeights, WeightFileError

# ComfyUI before mid-2024 calls attn1 without transformer_options.
LEGACY = "transformer_options" not in inspect.signature(CrossAttention.forward).parameters


@pytest.fixture(scope="module")
def comfy_sd():
    import comfy.sd

    return comfy.sd


@pytest.fixture()
def sd15(load_tiny):
    return load_tiny("tiny_sd15")


def _sites(patching, model):
    return patching.find_attention_sites(model.model.diffusion_model)


def test_input_model_is_not_mutated(patching, sd15):
    before_patches, before_options = dict(sd15.object_patches), repr(sd15.model_options)
    weights = DeltaConvWeights.fresh(_sites(patching, sd15), seed=1)
    clone, report, _runtime = patching.patch_model(sd15, weights)
    assert sd15.object_patches == before_patches and repr(sd15.model_options) == before_options
    assert len(clone.object_patches) == 7
    live = sd15.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    assert type(live).__name__ == "CrossAttention"  # object patches are only installed when the clone is loaded
    assert report.startswith("ΔConv patch: 7 of 7 self-attention sites replaced")


def test_wrapper_keeps_projections_and_repatching_replaces(patching, sd15):
    sites = _sites(patching, sd15)
    first, _, _ = patching.patch_model(sd15, DeltaConvWeights.fresh(sites, seed=1))
    second, _, _ = patching.patch_model(first, DeltaConvWeights.fresh(sites, seed=2))
    path = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"
    original = sd15.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1
    wrapper = second.object_patches[path]
    assert wrapper.original is original  # not a wrapper around a wrapper
    assert wrapper.to_q is original.to_q and wrapper.to_out is original.to_out
    names = dict(wrapper.named_parameters())
    assert "to_q.weight" in names and "student.conv_up.weight" in names
    assert not any(n.startswith("_original") for n in names)


def _run(wrapper, x, context=None, value=None, **options):
    """Call a wrapper as this ComfyUI's BasicTransformerBlock would (older ones pass no transformer_options)."""
    with torch.no_grad():
        if LEGACY:
            wrapper.runtime.stashed_options = options
            return wrapper(x, context=context, value=value)
        return wrapper(x, context=context, value=value, transformer_options=options)


def test_delta_path_and_exact_fallback(patching, sd15):
    clone, _, runtime = patching.patch_model(sd15, DeltaConvWeights.fresh(_sites(patching, sd15), seed=3))
    wrapper = clone.object_patches["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"]
    x = torch.randn(2, 7 * 5, 320)
    out = _run(wrapper, x, activations_shape=[2, 320, 7, 5])
    with torch.no_grad():
        assert torch.equal(out, wrapper.student(x.reshape(2, 7, 5, 320)).reshape(2, 35, 320))
        # Tokens not on the grid (ToMe/HyperTile): the original attention, exactly.
        merged = x[:, :20]
        assert torch.equal(_run(wrapper, merged, activations_shape=[2, 320, 7, 5]), wrapper.original(merged))
        # Keys/values from elsewhere (reference-only): the original attention with that context.
        ctx = torch.randn(2, 50, 320)
        got = _run(wrapper, x, context=ctx, value=ctx, activations_shape=[2, 320, 7, 5])
        assert torch.equal(got, wrapper.original(x, context=ctx, value=ctx))
    assert runtime.counts == {"deltaconv": 1, "attention:tokens rearranged": 1, "attention:context": 1}


def test_older_comfyui_grid_from_latent_shape(patching, sd15):
    clone, _, runtime = patching.patch_model(sd15, DeltaConvWeights.fresh(_sites(patching, sd15), seed=4))
    wrapper = clone.object_patches["diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1"]
    runtime.stashed_options = {"original_shape": [1, 4, 13, 9]}  # what an attn1_patch sees on old ComfyUI
    x = torch.randn(1, 7 * 5, 320)  # level 1 of a 13×9 latent: ceil halves → 7×5
    with torch.no_grad():
        assert torch.equal(wrapper(x), wrapper.student(x.reshape(1, 7, 5, 320)).reshape(1, 35, 320))
    assert runtime.counts == {"deltaconv": 1}


@pytest.mark.parametrize("latent, tokens, grid", [((64, 64), 4096, (64, 64)), ((64, 64), 256, (16, 16)),
                                                  ((13, 9), 35, (7, 5)), ((13, 9), 12, (4, 3)),
                                                  ((13, 9), 11, None), ((1, 1), 1, (1, 1))])
def test_infer_grid(latent, tokens, grid):
    assert infer_grid(latent, tokens) == grid


def test_blocks_follow_model_dtype_and_cast_per_call(patching, comfy_sd, tiny_models):
    load = getattr(comfy_sd, "load_diffusion_model", None) or comfy_sd.load_unet
    kwargs = {"model_options": {"dtype": torch.bfloat16}} if hasattr(comfy_sd, "load_diffusion_model") else {}
    model = load(tiny_models["tiny_sd15"], **kwargs)
    dtype = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.dtype
    clone, _, _ = patching.patch_model(model, DeltaConvWeights.fresh(_sites(patching, model), seed=5))
    wrapper = clone.object_patches["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"]
    assert {p.dtype for p in wrapper.student.parameters()} == {dtype}
    x = torch.randn(1, 16, 320, dtype=torch.float32)  # activations in another dtype than the stored weights
    out = _run(wrapper, x, activations_shape=[1, 320, 4, 4])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_missing_blocks_reported_or_refused_when_strict(patching, sd15):
    weights = DeltaConvWeights.fresh(_sites(patching, sd15), seed=6)
    del weights.students["mid_block.attentions.0.transformer_blocks.0"]
    clone, report, _ = patching.patch_model(sd15, weights)
    assert len(clone.object_patches) == 6
    assert "1 sites have no block in the file and keep attention: mid_block.attentions.0" in report
    with pytest.raises(ValueError, match=r"1 of 7 self-attention sites have no ΔConv block.*turn strict off"):
        patching.patch_model(sd15, weights, strict=True)


def test_wrong_channels_refused_naming_the_block(patching, sd15):
    weights = DeltaConvWeights.fresh(_sites(patching, sd15), seed=7)
    name = "up_blocks.0.attentions.1.transformer_blocks.0"
    config, sd = weights.students[name]
    weights.students[name] = (type(config)(640, config.kernel_size), sd)
    with pytest.raises(WeightFileError, match=f"block {name} expects 320 channels, the file has 640"):
        patching.patch_model(sd15, weights)


def test_conflicts_are_reported(patching, sd15):
    lora = sd15.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    lora.add_patches({key: (torch.zeros(320, 320),)}, 1.0)
    lora.set_model_attn1_replace(lambda q, k, v, extra: q, "middle", 0)
    _, report, _ = patching.patch_model(lora, DeltaConvWeights.fresh(_sites(patching, sd15), seed=8))
    assert "1 weight patches (LoRA/merges) touch replaced self-attention layers" in report
    assert "attn1 replace patches at ('middle', 0" in report


def test_bad_percent_range(patching, sd15):
    with pytest.raises(ValueError, match="start_percent"):
        patching.patch_model(sd15, DeltaConvWeights.fresh(_sites(patching, sd15)), start_percent=0.8,
                             end_percent=0.2)


def test_foreign_attn1_replacement_without_projections_is_refused(patching, sd15):
    other = sd15.clone()
    other.add_object_patch("diffusion_model.middle_block.1.transformer_blocks.0.attn1", torch.nn.Identity())
    with pytest.raises(ValueError, match=r"middle_block.1.transformer_blocks.0.attn1 was already replaced.*Identity"
                                         r".*put ΔConv Patch before that node"):
        patching.patch_model(other, DeltaConvWeights.fresh(_sites(patching, sd15), seed=9))
