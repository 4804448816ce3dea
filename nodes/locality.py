"""ΔConv Attention Locality: how local each self-attention layer of a model is, and which kernel would fit it
(video models: in space and in time)."""
import json
import math

import comfy.model_management
import torch
import torch.nn.functional as F

from ..deltaconv_core.analysis import attention_probabilities, locality_stats, video_locality_stats
from ..deltaconv_core.attention import PatchRuntime
from ..deltaconv_core.block import MAX_KERNEL_SIZE
from ..deltaconv_core.families import find_attention_sites
from ..deltaconv_core.metrics import colormap
from . import compat
from .comfy_denoiser import ComfyDenoiser
from .validation import check_widgets, require_widgets, validates_widgets
from .wrappers import PREFIX, install_runtime_hooks, install_teacher_wrapper, original_attention


def _attention_maps(adapter, module, recorded, queries):
    """Head-averaged attention probabilities of the chosen query tokens of image 0 over all its tokens: [Q, N]."""
    q, k, heads = adapter.queries_keys(module, recorded.x[0], recorded.call)
    return attention_probabilities(q[queries], k, heads)


def _positions(flat: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Flat token indices → their [Q, len(grid)] integer positions on the grid (row-major, as the tokens are)."""
    return torch.stack(torch.unravel_index(flat, grid), dim=1)


def measure(model, sites, positive, latent_shape, sigma, seed, max_queries):
    """Record the input of each of the model's attention `sites` at one sigma on a latent of `latent_shape`
    ([C, H, W] or a video's [C, T, H, W]), then compute its locality statistics (video grids: in space and time)."""
    runtime = PatchRuntime()
    runtime.teacher.recording = {}
    clone = model.clone()
    for s in sites.sites:  # teacher-only wrappers: they run the original attention and record its input
        install_teacher_wrapper(clone, sites, s, original_attention(model, sites, s), runtime)
    install_runtime_hooks(clone, runtime)
    comfy.model_management.load_models_gpu([clone])
    device = comfy.model_management.get_torch_device()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, *latent_shape, generator=g).to(device)
    sigma_t = torch.full((1,), float(sigma), device=device)
    denoise = ComfyDenoiser(clone, positive, None, noise)
    denoise(noise * sigma_t.view(-1, *[1] * len(latent_shape)), sigma_t, torch.zeros(1, dtype=torch.bool))
    results = []
    for s in sites.sites:
        recorded = runtime.teacher.recording.get(s.name)
        if recorded is None:
            continue
        grid = recorded.grid
        pick = torch.randperm(math.prod(grid), generator=g)[:max_queries]
        module = clone.object_patches[PREFIX + s.path].original
        maps = _attention_maps(sites.adapter, module, recorded, pick.to(recorded.x.device)).cpu()
        stats = (locality_stats if len(grid) == 2 else video_locality_stats)(maps, _positions(pick, grid), grid)
        results.append((s, grid, stats))
    if not results:
        raise ValueError(f"ΔConv Attention Locality: none of the model's {len(sites.sites)} self-attention layers "
                         "ran on its plain token grid, so there is nothing to measure. Another patch on this model "
                         "rearranges the tokens (ToMe, HyperTile, window attention) or gives self-attention other "
                         "keys/values (reference-only, hypernetworks): connect the model before those patches.")
    return results


def _image_row(s, grid, st) -> str:
    return (f"{s.name} | {'x'.join(map(str, grid))} | {s.kernel_size} | {st.mass_in_kernel(s.kernel_size):.3f} | "
            f"{st.uniform_fraction:.3f} | {st.erf} | {st.suggested_kernel}")


def _video_row(s, grid, st, time_kernel, box) -> str:
    """`box`: the preset's (k, time k), whose k × k × time k window's share of the attention the row ends with."""
    return (f"{_image_row(s, grid, st.spatial)} | {time_kernel} | {st.mass_in_time_kernel(time_kernel):.3f} | "
            f"{st.time_erf} | {st.suggested_time_kernel} | {st.mass_in_box(*box):.3f}")


IMAGE_HEADER = "site | grid | official k | mass in official k | uniform share | ERF | suggested k"
VIDEO_HEADER = ("site | grid (frames x h x w) | k | mass in k | uniform share | ERF | suggested k | time k | "
                "mass in time k | time ERF (frames) | suggested time k | mass in suggested k x k x time k")


def report_and_preset(results, time_kernel: int) -> tuple[str, str]:
    """The report's table and the kernel preset ({block: k}, video {block: [k, time k]}, capped at what the
    fused kernels take) of measured (site, grid, stats) rows."""
    video = any(len(grid) == 3 for _, grid, _ in results)
    lines = [VIDEO_HEADER if video else IMAGE_HEADER]
    preset = {}
    for s, grid, st in results:
        if len(grid) == 3:
            preset[s.name] = [min(st.spatial.suggested_kernel, MAX_KERNEL_SIZE),
                              min(st.suggested_time_kernel, MAX_KERNEL_SIZE)]
            lines.append(_video_row(s, grid, st, time_kernel, preset[s.name]))
        else:
            lines.append(_image_row(s, grid, st))
            preset[s.name] = min(st.suggested_kernel, MAX_KERNEL_SIZE)
    return "\n".join(lines), json.dumps(preset)


def _heat(m: torch.Tensor, size=96) -> torch.Tensor:
    """A [size, size, 3] heat map (metrics.colormap: black → pale yellow) of one aligned attention map (log scale)."""
    v = torch.log10(m.clamp(min=1e-6))
    v = (v - v.min()) / (v.max() - v.min()).clamp(min=1e-6)
    return colormap(F.interpolate(v[None, None], size=(size, size), mode="nearest")[0, 0])


@validates_widgets
class DeltaConvAttentionLocality:
    DESCRIPTION = ("Measures how local each self-attention layer is (the ΔConvFusion analysis): the centroid-aligned "
                   "mean attention map, attention mass within k×k, the uniform share, and a suggested odd kernel "
                   "(≈ 0.6 × the window holding 80 % of the local mass). Video models (connect their empty latent): "
                   "also the mass within a number of frames and a suggested kernel over time (the window of frames "
                   "holding 80 % of the local mass). The preset output feeds ΔConv Distill.")
    CATEGORY = "ΔConv/analysis"
    SEARCH_ALIASES = ("attention locality", "attention map", "receptive field", "kernel size", "convfusion",
                      "linear attention", "analyse attention")
    RETURN_TYPES = ("IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("maps", "report", "kernel_preset")
    OUTPUT_TOOLTIPS = ("One heat map per layer: the centroid-aligned mean attention map (log scale).",
                       "Per layer: grid, official kernel, attention mass within it, uniform share, ERF and the "
                       "suggested kernel.",
                       f"JSON {{block name: suggested kernel, at most {MAX_KERNEL_SIZE}}} (video: [spatial, time]), "
                       "for ΔConv Distill's kernel_preset.")
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
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "Analyse at this latent's size instead of width × height. Needed for "
                                             "video models (Wan): connect their empty video latent (e.g. "
                                             "EmptyHunyuanLatentVideo) to measure locality over frames too."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        return check_widgets(cls, widgets)

    def analyse(self, model, positive, width, height, sigma, seed, max_queries, latent=None):
        require_widgets(type(self), locals())
        sites = find_attention_sites(model.model.diffusion_model)
        if latent is not None:
            shape = tuple(latent["samples"].shape[1:])
        elif sites.adapter.grid_dims == 3:
            raise ValueError(f"ΔConv Attention Locality: {sites.adapter.label} makes videos, and width × height says "
                             "nothing about frames: connect its empty video latent (e.g. EmptyHunyuanLatentVideo, "
                             "a few dozen frames at a low resolution is plenty) to `latent`.")
        else:
            shape = (compat.latent_channels(model), height // 8, width // 8)
        results = measure(model, sites, positive, shape, sigma, seed, max_queries)
        report, preset = report_and_preset(results, sites.adapter.time_kernel)
        tiles = [_heat(getattr(st, "spatial", st).aligned_map) for _, _, st in results]
        cols = min(8, len(tiles))
        rows = -(-len(tiles) // cols)
        canvas = torch.zeros(rows * 96, cols * 96, 3)
        for i, t in enumerate(tiles):
            canvas[(i // cols) * 96:(i // cols + 1) * 96, (i % cols) * 96:(i % cols + 1) * 96] = t
        return {"ui": {"text": [report, preset]}, "result": (canvas[None], report, preset)}
