"""ΔConv Attention Locality: how local each self-attention layer of a model is, and which kernel would fit it."""
import json

import comfy.model_management
import torch
import torch.nn.functional as F

from ..deltaconv_core.analysis import attention_probabilities, locality_stats
from ..deltaconv_core.attention import PatchRuntime
from ..deltaconv_core.block import MAX_KERNEL_SIZE
from ..deltaconv_core.families import find_attention_sites
from ..deltaconv_core.metrics import colormap
from . import compat
from .comfy_denoiser import ComfyDenoiser
from .validation import check_widgets, require_widgets, validates_widgets
from .wrappers import PREFIX, install_runtime_hooks, install_teacher_wrapper, original_attention


def _attention_maps(adapter, module, x, queries):
    """Head-averaged attention probabilities of the chosen query tokens of image 0 over all its tokens: [Q, N]."""
    q, k, heads = adapter.queries_keys(module, x[0])
    return attention_probabilities(q[queries], k, heads)


def measure(model, positive, latent_hw, sigma, seed, max_queries):
    """Record every site's attention input at one sigma, then compute its locality statistics."""
    sites = find_attention_sites(model.model.diffusion_model)
    runtime = PatchRuntime()
    runtime.teacher.recording = {}
    clone = model.clone()
    for s in sites.sites:  # teacher-only wrappers: they run the original attention and record its input
        install_teacher_wrapper(clone, sites, s, original_attention(model, sites, s), runtime)
    install_runtime_hooks(clone, runtime)
    comfy.model_management.load_models_gpu([clone])
    device = comfy.model_management.get_torch_device()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, compat.latent_channels(model), *latent_hw, generator=g).to(device)
    sigma_t = torch.full((1,), float(sigma), device=device)
    denoise = ComfyDenoiser(clone, positive, None, noise)
    denoise(noise * sigma_t.view(-1, 1, 1, 1), sigma_t, torch.zeros(1, dtype=torch.bool))
    results = []
    for s in sites.sites:
        if s.name not in runtime.teacher.recording:
            continue
        x, (h, w), _ = runtime.teacher.recording[s.name]
        n = h * w
        pick = torch.randperm(n, generator=g)[:max_queries]
        maps = _attention_maps(sites.adapter, clone.object_patches[PREFIX + s.path].original, x, pick.to(x.device))
        yx = torch.stack([pick // w, pick % w], dim=1)
        results.append((s, (h, w), locality_stats(maps.cpu(), yx, (h, w))))
    if not results:
        raise ValueError(f"ΔConv Attention Locality: none of the model's {len(sites.sites)} self-attention layers "
                         "ran on its plain token grid, so there is nothing to measure. Another patch on this model "
                         "rearranges the tokens (ToMe, HyperTile, window attention) or gives self-attention other "
                         "keys/values (reference-only, hypernetworks): connect the model before those patches.")
    return sites, results


def _heat(m: torch.Tensor, size=96) -> torch.Tensor:
    """A [size, size, 3] heat map (metrics.colormap: black → pale yellow) of one aligned attention map (log scale)."""
    v = torch.log10(m.clamp(min=1e-6))
    v = (v - v.min()) / (v.max() - v.min()).clamp(min=1e-6)
    return colormap(F.interpolate(v[None, None], size=(size, size), mode="nearest")[0, 0])


@validates_widgets
class DeltaConvAttentionLocality:
    DESCRIPTION = ("Measures how local each self-attention layer is (the ΔConvFusion analysis): the centroid-aligned "
                   "mean attention map, attention mass within k×k, the uniform share, and a suggested odd kernel "
                   "(≈ 0.6 × the window holding 80 % of the local mass). The preset output feeds ΔConv Distill.")
    CATEGORY = "ΔConv/analysis"
    SEARCH_ALIASES = ("attention locality", "attention map", "receptive field", "kernel size", "convfusion",
                      "linear attention", "analyse attention")
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("maps", "report", "kernel_preset")
    OUTPUT_TOOLTIPS = ("One heat map per layer: the centroid-aligned mean attention map (log scale).",
                       "Per layer: grid, official kernel, attention mass within it, uniform share, ERF and the "
                       "suggested kernel.",
                       f"JSON {{block name: suggested kernel, at most {MAX_KERNEL_SIZE}}}, for ΔConv Distill's "
                       "kernel_preset.")
    FUNCTION = "analyse"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose self-attention is measured (patches on it count)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt for the one model call that is measured."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                              "tooltip": "Image width in pixels to analyse at (the latent is 1/8)."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                               "tooltip": "Image height in pixels to analyse at (the latent is 1/8)."}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1000.0, "step": 0.01,
                                "tooltip": "Noise level to analyse at (middle of sampling ≈ 1 for SD)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "tooltip": "Seed of the noise and of the "
                                                                              "sampled query positions."}),
            "max_queries": ("INT", {"default": 64, "min": 1, "max": 4096,
                                    "tooltip": "Query positions sampled per layer (memory: queries × tokens)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        return check_widgets(cls, widgets)

    def analyse(self, model, positive, width, height, sigma, seed, max_queries):
        require_widgets(type(self), locals())
        _sites, results = measure(model, positive, (height // 8, width // 8), sigma, seed, max_queries)
        lines = ["site | grid | official k | mass in official k | uniform share | ERF | suggested k"]
        for s, (h, w), st in results:
            lines.append(f"{s.name} | {h}x{w} | {s.kernel_size} | {st.mass_in_kernel(s.kernel_size):.3f} | "
                         f"{st.uniform_fraction:.3f} | {st.erf} | {st.suggested_kernel}")
        # The fused kernels take odd sizes up to MAX_KERNEL_SIZE; larger suggestions are capped for the preset.
        preset = json.dumps({s.name: min(st.suggested_kernel, MAX_KERNEL_SIZE) for s, _, st in results})
        tiles = [_heat(st.aligned_map) for _, _, st in results]
        cols = min(8, len(tiles))
        rows = -(-len(tiles) // cols)
        canvas = torch.zeros(rows * 96, cols * 96, 3)
        for i, t in enumerate(tiles):
            canvas[(i // cols) * 96:(i // cols + 1) * 96, (i % cols) * 96:(i % cols + 1) * 96] = t
        report = "\n".join(lines)
        return {"ui": {"text": [report, preset]}, "result": (canvas[None], report, preset)}
