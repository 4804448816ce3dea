"""The compact graph description the workflows are written in, and the node groups they share.

A graph is {key: N(class_type, title, color, **inputs)}; an input is a literal or a (node key, output slot) link.
Widget order, sockets and layout come later from the real node schemas (ui_format.py); a node may also carry "models"
(its files for the missing-models dialog) and "size" (its box in the editor, else one fitted to its widgets).
"""
from .models import MODELS


class Model(str):
    """A widget value that names a model file; the node lists it in properties.models (the missing-model dialog)."""

    def __new__(cls, key, *extra):
        obj = super().__new__(cls, MODELS[key]["name"])
        obj.models = [MODELS[k] for k in (key, *extra)]
        return obj


class Seed(int):
    """A seed widget value plus its control_after_generate mode ("fixed" or "randomize")."""

    def __new__(cls, value, control="randomize"):
        obj = super().__new__(cls, value)
        obj.control = control
        return obj


def N(class_type, title=None, color=None, **inputs):
    """A node: inputs are literals or (node key, output slot) links."""
    return {"class_type": class_type, "title": title, "color": color, "inputs": inputs}


# Outputs a user reads after a run, each shown on the canvas by a core Preview Any (in ComfyUI since May 2025),
# and per output name the display's title label and size (a report wraps to ~12 lines of the 10 px font).
DISPLAYED = {"DeltaConvPatch": ("report",), "DeltaConvCompare": ("psnr", "ssim", "report"),
             "DeltaConvAttentionLocality": ("report",)}
DISPLAY_STYLE = {"report": ("report", [400, 230]), "psnr": ("PSNR (dB)", [315, 100]), "ssim": ("SSIM", [315, 100])}

NEG = "blurry, lowres, deformed, watermark, text"
DC_NOTE = ("ΔConv Load/Patch: the official ΔConvFusion blocks (https://huggingface.co/7eu7d7/ConvFusion) go in "
           "ComfyUI/models/deltaconv. ΔConv Patch sits between the model loader and the sampler; levels = all, "
           "0 → 1 reproduces the paper.")


def prompts(clip, pos, neg=NEG):
    return {"pos": N("CLIPTextEncode", "Positive", "green", text=pos, clip=clip),
            "neg": N("CLIPTextEncode", "Negative", "red", text=neg, clip=clip)}


def deltaconv(model, weights, levels="all"):
    return {"dc_load": N("DeltaConvLoad", color="purple", weights_name=Model(weights)),
            "dc_patch": N("DeltaConvPatch", color="purple", model=model, deltaconv=("dc_load", 0), start_percent=0.0,
                          end_percent=1.0, levels=levels, strict=False)}


def sampler(model, latent, seed, steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0,
            title=None, pos=("pos", 0), neg=("neg", 0)):
    return N("KSampler", title, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
             scheduler=scheduler, positive=pos, negative=neg, latent_image=latent, denoise=denoise)


def output(samples, vae, prefix, key=""):
    return {f"decode{key}": N("VAEDecode", samples=samples, vae=vae),
            f"save{key}": N("SaveImage", images=(f"decode{key}", 0), filename_prefix=prefix)}


def sd15_base(ckpt="dreamshaper", size=512, pos="a cozy wooden cabin in a snowy pine forest at dusk, warm light in "
                                               "the windows, highly detailed photograph"):
    return {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model(ckpt)), **prompts(("ckpt", 1), pos),
            "latent": N("EmptyLatentImage", width=size, height=size, batch_size=1),
            **deltaconv(("ckpt", 0), "dc_sd15")}


def distill(model, latents, prefix, preset=None, try_latent=None, vae=("ckpt", 2), **try_sampler):
    """ΔConv Distill, or ΔConv Distill (simple) with `preset`, then Save, a loss graph and a try-out sampler."""
    data = dict(model=model, latents=latents, positive=("pos", 0), negative=("neg", 0), filename_prefix=prefix)
    return {
        "distill": N("DeltaConvDistillSimple", color="purple", preset=preset, **data) if preset else
        N("DeltaConvDistill", color="purple", stage="A", steps=2000, learning_rate=3e-4, batch_size=4,
          seed=Seed(0, "fixed"), save_every=500, warmup_steps=500, grad_accumulation=1, training_dtype="bf16",
          gradient_checkpointing=False, min_snr_gamma=0.0, kernel_preset="", allow_cpu=False, **data),
        "dc_save": N("DeltaConvSave", color="purple", deltaconv=("distill", 0), filename=prefix, overwrite=False),
        "loss": N("LossGraphNode", loss=("distill", 1), filename_prefix=f"{prefix}_loss"),
        # try the new blocks right away: the same model, patched with what was just learned
        "dc_patch": N("DeltaConvPatch", "ΔConv Patch (student)", "purple", model=model, deltaconv=("distill", 0),
                      start_percent=0.0, end_percent=1.0, levels="all", strict=False),
        "try_latent": try_latent or N("EmptyLatentImage", width=512, height=512, batch_size=1),
        "try": sampler(("dc_patch", 0), ("try_latent", 0), Seed(7, "fixed"), **{"steps": 20, **try_sampler},
                       title="KSampler (student)"),
        "try_decode": N("VAEDecode", samples=("try", 0), vae=vae),
        "try_preview": N("PreviewImage", images=("try_decode", 0)),
    }


def with_displays(graph, info):
    """The graph with a Preview Any right after each DISPLAYED output's node; `info`: node schemas (output slots)."""
    out = {}
    for key, node in graph.items():
        out[key] = node
        for name in DISPLAYED.get(node["class_type"], ()):
            schema, (label, size) = info[node["class_type"]], DISPLAY_STYLE[name]
            title = f"{node['title'] or schema['display_name']} · {label}"
            out[f"{key}_{name}"] = {**N("PreviewAny", title, source=(key, schema["output_name"].index(name))),
                                    "size": size}
    return out
