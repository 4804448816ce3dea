"""ΔConv Compare: the original and the ΔConv-patched model sampled from one seed, with PSNR, SSIM and a heat map."""
import logging
import time
from collections import Counter

import comfy.model_management
import comfy.samplers

from ..deltaconv_core.families import UnsupportedModelError, find_attention_sites
from ..deltaconv_core.metrics import abs_difference, difference_heatmap, psnr, ssim
from ..deltaconv_core.students import STUDENTS
from .validation import check_widgets, require_widgets, validates_widgets
from .wrappers import delta_runtimes, student_wrappers

log = logging.getLogger("deltaconv")
NOT_PATCHED = ("patched_model carries no ΔConv patch, so both images would come from the same model: connect the "
               "MODEL output of ΔConv Patch to patched_model (and the model before it to model)")


def model_kind(model) -> str:
    """The model's family for messages: ΔConv's description (e.g. 'SDXL (70 self-attention sites)'), else
    ComfyUI's configuration class."""
    try:
        return find_attention_sites(model.model.diffusion_model).variant
    except UnsupportedModelError:
        return type(model.model.model_config).__name__


def check_same_family(model, patched_model):
    """Both models sample from one latent and conditioning: another family fails mid-sampling, so refuse it now."""
    if type(model.model.model_config) is not type(patched_model.model.model_config):
        raise ValueError(f"model is {model_kind(model)} but patched_model is {model_kind(patched_model)}: ΔConv "
                         "Compare samples both from the same latent and prompts, so they must be one family. Connect "
                         "the model that went into ΔConv Patch to model")


def sample(model, latent, seed, steps, cfg, sampler_name, scheduler, positive, negative, denoise):
    """KSampler's own sampling (same noise from the same seed); returns (latent, seconds without weight loading)."""
    import nodes  # ComfyUI's nodes.py: the server has it loaded; imported here so library use stays light

    comfy.model_management.load_models_gpu([model])
    start = time.perf_counter()
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=denoise)
    return out, time.perf_counter() - start  # samples come back on the CPU by default: synchronised


def decode(vae, latent):
    """(images [N, H, W, C], frames per video): video VAEs give [B, T, H, W, C], flattened to B·T frames as VAEDecode
    does; frames is 0 for images."""
    images = vae.decode(latent["samples"])
    return images.reshape(-1, *images.shape[-3:]), images.shape[1] if images.dim() == 5 else 0


def call_counts(runtimes) -> Counter:
    total = Counter()
    for runtime in runtimes:
        total.update(runtime.counts)
    return total


def student_calls(calls, kinds) -> str:
    """How often each student kind of the patched model ran, by setting where it has one (call keys are
    "<kind>" or "<kind>:<setting>"): "24 ran ΔConv block, 12 ran mediator attention (6 with 4, 6 with 16 mediators)"."""
    parts = []
    for kind in sorted(kinds):
        per_setting = sorted((int(key.partition(":")[2] or 0), n) for key, n in calls.items()
                             if key.partition(":")[0] == kind)
        detail = ", ".join(f"{n} with {setting}" for setting, n in per_setting if setting)
        parts.append(f"{sum(n for _, n in per_setting)} ran {STUDENTS[kind].label}"
                     + (f" ({detail} {kind})" if detail else ""))
    return ", ".join(parts)


def report(settings, original, patched, times, calls, student_kinds, notes, frames=0):
    """`frames`: frames per video when the images are videos' frames (0: images); each video then gets its frames'
    lines and their mean."""
    p, s = psnr(original, patched), ssim(original, patched)
    diff = abs_difference(original, patched)
    lines = [f"ΔConv Compare: {settings}"]
    for i in range(len(p)):
        quality = f"identical (PSNR inf, SSIM {s[i]:.4f})" if p[i].isinf() else f"PSNR {p[i]:.2f} dB, SSIM {s[i]:.4f}"
        label = f"video {i // frames + 1}, frame {i % frames + 1}" if frames else f"image {i + 1}"
        lines.append(f"  {label}: {quality}, mean |Δ| {diff[i].mean():.4f}, max |Δ| {diff[i].max():.4f}")
        if frames and (i + 1) % frames == 0:
            video = slice(i + 1 - frames, i + 1)
            lines.append(f"  video {i // frames + 1}, mean over {frames} frames: PSNR {p[video].mean():.2f} dB, "
                         f"SSIM {s[video].mean():.4f}")
    if p.isinf().all():
        lines.append("  the patched images are identical to the original ones: ΔConv changed nothing "
                     "(check start/end percent of ΔConv Patch)")
    else:
        videos = len(p) // max(frames, 1)
        what = f"{videos} video{'s' * (videos != 1)} of {frames} frames" if frames else f"{len(p)} image(s)"
        lines.append(f"  mean over {what}: PSNR {p.mean():.2f} dB, SSIM {s.mean():.4f}")
    scale = float(diff.max())
    lines.append(f"  heat map: per-pixel mean |Δ| over the channels (pixel values 0-1), black = 0 to pale yellow = "
                 f"{scale:.4f} (the largest)" if scale > 0 else "  heat map: black, no difference")
    lines.append(f"  sampling time (weight loading excluded): original {times[0]:.2f} s, patched {times[1]:.2f} s "
                 f"(speed-up {times[0] / max(times[1], 1e-9):.2f}x)")
    fallbacks = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(calls.items()) if k.startswith("attention:"))
    lines.append(f"  self-attention calls of the patched model: {student_calls(calls, student_kinds)}"
                 + (f"; original attention: {fallbacks}" if fallbacks else ""))
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines), p, s


@validates_widgets
class DeltaConvCompare:
    DESCRIPTION = ("Samples the original and the ΔConv-patched model from the same seed and settings (as KSampler "
                   "does), decodes both and measures the difference: PSNR and SSIM per image (video: per frame and per "
                   "video), a heat map of the per-pixel difference, both sampling times and how often each "
                   "student (ΔConv, mediator attention by count) ran. Times exclude weight loading; the first run "
                   "after starting ComfyUI also includes one-off warm-up (kernel compilation): run again with "
                   "another seed for steady-state times.")
    CATEGORY = "ΔConv/analysis"
    SEARCH_ALIASES = ("compare attention", "psnr", "ssim", "speed test", "benchmark", "convfusion",
                      "linear attention", "before after")
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("original", "patched", "difference", "psnr", "ssim", "report")
    OUTPUT_TOOLTIPS = ("Decoded images of model.", "Decoded images of patched_model.",
                       "Per-pixel difference heat map (scale in the report).",
                       "PSNR in dB, mean over the batch (inf: identical).", "SSIM, mean over the batch (1: identical).",
                       "Per-image PSNR/SSIM, differences, times and ΔConv call counts.")
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The original model (before ΔConv Patch)."}),
            "patched_model": ("MODEL", {"tooltip": "The MODEL output of ΔConv Patch."}),
            "vae": ("VAE", {"tooltip": "Decodes both results for the comparison."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt, as for KSampler."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt, as for KSampler."}),
            "latent_image": ("LATENT", {"tooltip": "Starting latent, as for KSampler (e.g. Empty Latent Image)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "One seed for both models, so only the model differs."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps, as for KSampler."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale, as for KSampler."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": comfy.samplers.KSampler.SAMPLERS[0],
                                                                "tooltip": "Sampler, as for KSampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": comfy.samplers.KSampler.SCHEDULERS[0],
                                                               "tooltip": "Scheduler, as for KSampler."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Denoising strength, as for KSampler (1 = from pure noise)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        return check_widgets(cls, widgets)

    def compare(self, model, patched_model, vae, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, denoise):
        require_widgets(type(self), locals())
        runtimes = delta_runtimes(patched_model)
        if not runtimes:
            raise ValueError(NOT_PATCHED)
        check_same_family(model, patched_model)
        notes = []
        if delta_runtimes(model):
            notes.append("model carries a ΔConv patch too: this compares two patches, not attention with ΔConv")
        if not model.is_clone(patched_model):
            notes.append("patched_model was not made from model (different weights): the difference is not only "
                         "ΔConv's")
        args = (seed, steps, cfg, sampler_name, scheduler, positive, negative, denoise)
        original, t_original = sample(model, latent_image, *args)
        before = call_counts(runtimes)
        patched, t_patched = sample(patched_model, latent_image, *args)
        calls = call_counts(runtimes) - before
        (original_images, frames), (patched_images, _) = decode(vae, original), decode(vae, patched)
        images = original_images, patched_images
        settings = f"seed {seed}, {steps} steps, {sampler_name}/{scheduler}, cfg {cfg}, denoise {denoise}"
        kinds = {w.student_type for w in student_wrappers(patched_model)}
        text, p, s = report(settings, *images, (t_original, t_patched), calls, kinds, notes, frames)
        for line in text.splitlines():
            log.info("%s", line.strip())
        result = (*images, difference_heatmap(*images), float(p.mean()), float(s.mean()), text)
        return {"ui": {"text": [text]}, "result": result}
