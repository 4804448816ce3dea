"""fp8-stored UNets (UNETLoader weight_dtype) patched with ΔConv: sampled through the real server, blocks stored
in a real float dtype and cast per call like the model's own layers."""
import pytest
import torch
from graphs import digest, txt2img

from deltaconv_core.block import DeltaConvBlock
from deltaconv_core.families import find_attention_sites
from deltaconv_core.weights import DeltaConvWeights

SITES, STEPS = 7, 2


def patched(server, weight_dtype):
    return digest(server.run(txt2img("sd15", "tiny_sd15_random.safetensors", seed=131, steps=STEPS,
                                     unet_inputs={"weight_dtype": weight_dtype})))


@pytest.fixture(scope="module")
def full_precision(server):
    required = server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]
    if "weight_dtype" not in required:
        pytest.skip("this ComfyUI's UNETLoader has no weight_dtype")
    return patched(server, "default")


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_model_patched_and_sampled(server, full_precision, weight_dtype):
    fp8 = patched(server, weight_dtype)
    assert fp8["counts"] == {"deltaconv": SITES * STEPS}  # every self-attention call ran its block
    assert fp8["finite"] and fp8["sha256"] != full_precision["sha256"]  # the UNet really ran in fp8
    # fp8 rounding of the UNet's own weights moves the result a little, not wholesale.
    assert abs(fp8["mean_abs"] - full_precision["mean_abs"]) < 0.1 * full_precision["mean_abs"]


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_blocks_of_fp8_model_stored_in_half_precision(pack, tiny_models, fp8):
    import comfy.sd

    if not hasattr(comfy.sd, "load_diffusion_model"):
        pytest.skip("this ComfyUI cannot load a diffusion model in a chosen storage dtype")
    model = comfy.sd.load_diffusion_model(tiny_models["tiny_sd15"], model_options={"dtype": fp8})
    sites = find_attention_sites(model.model.diffusion_model)
    clone, _, _ = pack.nodes.patching.patch_model(model, DeltaConvWeights.fresh(sites, seed=1))
    wrappers = [p for p in clone.object_patches.values() if hasattr(p, "runtime")]
    blocks = [m for w in wrappers for m in w.modules() if isinstance(m, DeltaConvBlock)]
    assert len(blocks) == SITES and wrappers[0].to_q.weight.dtype == fp8
    assert {p.dtype for b in blocks for p in b.parameters()} == {torch.float16}
    # A block call casts its weights to the activations' dtype, as ComfyUI's manual_cast layers do.
    assert blocks[0](torch.randn(1, 4, 4, blocks[0].config.dim)).dtype == torch.float32
