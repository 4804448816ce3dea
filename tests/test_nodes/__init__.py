"""Test-only ComfyUI nodes, loaded into the test server next to the pack (never shipped to users)."""
import hashlib
import os

import torch


class DeltaConvTestConditioning:
    """Seeded random CONDITIONING, so tests need no text encoder (SDXL/PixArt encoders cannot be made tiny)."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 512}),
                             "dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
                             "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 8192})}}

    def make(self, seed, tokens, dim, pooled_dim):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)} if pooled_dim else {}
        return ([[torch.randn(1, tokens, dim, generator=g), extra]],)


class DeltaConvTestZeroAttn1:
    """Zeroes every attn1 output through ComfyUI's own attn1_output_patch mechanism."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        m = model.clone()
        m.set_model_attn1_output_patch(lambda n, extra_options: torch.zeros_like(n))
        return (m,)


class ZeroWanSelfAttention(torch.nn.Module):
    def forward(self, x, freqs, transformer_options={}):  # noqa: B006 (Wan's own signature)
        return torch.zeros_like(x)


class DeltaConvTestZeroWanSelfAttn:
    """Removes Wan's self-attention (every block's self_attn outputs zero), as object patches."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        m = model.clone()
        for i in range(len(m.model.diffusion_model.blocks)):
            m.add_object_patch(f"diffusion_model.blocks.{i}.self_attn", ZeroWanSelfAttention())
        return (m,)


class DeltaConvTestAttn2Zero:
    """Replaces every cross-attention (attn2) core through set_model_attn2_replace, the mechanism IP-Adapter uses."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        m = model.clone()
        dm = m.model.diffusion_model
        for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
            for number, block in enumerate(blocks):
                if block is not None and any(hasattr(sub, "transformer_blocks") for sub in block):
                    m.set_model_attn2_replace(lambda q, k, v, extra_options: torch.zeros_like(q), name, number)
        return (m,)


class DeltaConvTestDigest:
    """Reports a latent's hash, shape and finiteness, and the ΔConv call counts of the model that made it."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ()
    FUNCTION = "digest"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}, "optional": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def digest(self, samples, model=None):
        x = samples["samples"].contiguous()
        info = {"sha256": hashlib.sha256(x.float().numpy().tobytes()).hexdigest(), "shape": list(x.shape),
                "finite": bool(torch.isfinite(x).all()), "mean_abs": float(x.abs().mean())}
        if model is not None:
            runtimes = {id(p.runtime): p.runtime for p in model.object_patches.values() if hasattr(p, "runtime")}
            counts, sites = {}, {}
            for runtime in runtimes.values():
                for total, part in ((counts, runtime.counts), (sites, runtime.site_counts)):
                    for k, v in part.items():
                        total[k] = total.get(k, 0) + v
                    part.clear()  # per-prompt counts: the patched clone is cached between prompts
            info["counts"], info["sites"] = counts, sites
            info["patched_sites"] = sum(1 for p in model.object_patches.values() if hasattr(p, "runtime"))
        return {"ui": {"digest": [info]}}


class DeltaConvTestSaveTensor:
    """Writes an IMAGE tensor unchanged (no 8-bit PNG rounding) to output/deltaconv_tensors/<name>.safetensors."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "images"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def save(self, images, name):
        import folder_paths
        from safetensors.torch import save_file

        path = os.path.join(folder_paths.get_output_directory(), "deltaconv_tensors", f"{name}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"images": images.contiguous()}, path)
        return {"ui": {"path": [path]}}


class DeltaConvTestShowFloat:
    """Reports a FLOAT output as repr() text (JSON has no inf)."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"forceInput": True})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def show(self, value):
        return {"ui": {"value": [repr(value)]}}


class DeltaConvTestShowText:
    """Reports a STRING output (an output node for graphs whose last node has none)."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    def show(self, text):
        return {"ui": {"text": [text]}}


class DeltaConvTestCopyKV:
    """Gives every attn1 copies of its keys and values through attn1_patch, as reference-only does: to ΔConv's
    wrappers each call then has keys/values from elsewhere, so every call stays on the original attention."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        m = model.clone()
        m.set_model_attn1_patch(lambda n, context, value, extra_options: (n, context.clone(), value.clone()))
        return (m,)


_WAN_VAES = {}


class DeltaConvTestWanVAE:
    """A Wan 2.1 VAE with seeded random weights, made in memory (a real-size file would be 250 MB): the tiny
    workflow runs decode Wan video latents with it."""
    CATEGORY = "ΔConv/tests"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def make(self, seed):
        import comfy.sd
        from comfy.ldm.wan.vae import WanVAE

        if seed not in _WAN_VAES:
            shapes = {k: v.shape for k, v in WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                   attn_scales=[], temperal_downsample=[False, True, True],
                                                   dropout=0.0).state_dict().items()}
            g = torch.Generator().manual_seed(seed)
            sd = {k: torch.ones(s) if k.endswith("gamma") else torch.zeros(s) if k.endswith("bias") else
                  torch.randn(s, generator=g) * (1.0 / max(1, s[1:].numel())) ** 0.5 for k, s in shapes.items()}
            _WAN_VAES[seed] = comfy.sd.VAE(sd=sd)
        return (_WAN_VAES[seed],)


NODE_CLASS_MAPPINGS = {
    "DeltaConvTestWanVAE": DeltaConvTestWanVAE,
    "DeltaConvTestConditioning": DeltaConvTestConditioning,
    "DeltaConvTestZeroAttn1": DeltaConvTestZeroAttn1,
    "DeltaConvTestZeroWanSelfAttn": DeltaConvTestZeroWanSelfAttn,
    "DeltaConvTestDigest": DeltaConvTestDigest,
    "DeltaConvTestAttn2Zero": DeltaConvTestAttn2Zero,
    "DeltaConvTestSaveTensor": DeltaConvTestSaveTensor,
    "DeltaConvTestShowFloat": DeltaConvTestShowFloat,
    "DeltaConvTestShowText": DeltaConvTestShowText,
    "DeltaConvTestCopyKV": DeltaConvTestCopyKV,
}
