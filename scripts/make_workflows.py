"""Builds the example workflows in workflows/ from compact API-format descriptions.

For each workflow it writes `workflows/<name>.json` (ComfyUI's UI/litegraph format: what the editor loads, and what
ComfyUI's Templates browser lists through GET /workflow_templates), `workflows/<name>.jpg` (its thumbnail, a
schematic of the graph) and `workflows/api/<name>.api.json` (the API-format twin that the tests queue). The API twins
live one folder down because /workflow_templates lists every `workflows/*.json`.

Widget order comes from real node schemas: a running ComfyUI's /object_info, read from a file (--object-info) or
fetched from a headless server started on a temporary base directory (COMFYUI_PATH or --comfyui). Third-party nodes
that are not installed (ComfyUI_IPAdapter_plus) come from the schemas kept in tests/test_workflows.py.

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python scripts/make_workflows.py
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
OUT = os.path.join(REPO, "workflows")
FRONTEND_VERSION = "1.27.10"  # the frontend that ComfyUI 0.3.64 ships; the format is the same for older ones
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CNR_IDS = {"ipadapter": "comfyui_ipadapter_plus"}  # category prefix → Comfy Registry id, for third-party nodes
THIRD_PARTY_VERSIONS = {"comfyui_ipadapter_plus": "2.0.0"}


def hf(repo, path, directory, name=None):
    return {"name": name or path.rsplit("/", 1)[-1], "url": f"https://huggingface.co/{repo}/resolve/main/{path}",
            "directory": directory}


MODELS = {
    "dreamshaper": hf("Lykon/DreamShaper", "DreamShaper_8_pruned.safetensors", "checkpoints"),
    "dreamshaper_inpaint": hf("Lykon/DreamShaper", "DreamShaper_8_INPAINTING.inpainting.safetensors", "checkpoints"),
    "sdxl": hf("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", "checkpoints"),
    "pixart": hf("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "transformer/diffusion_pytorch_model.safetensors",
                 "diffusion_models", name="PixArt-Sigma-XL-2-1024-MS.safetensors"),
    "t5xxl": hf("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors", "text_encoders"),
    "sdxl_vae": hf("stabilityai/sdxl-vae", "sdxl_vae.safetensors", "vae"),
    "canny": hf("comfyanonymous/ControlNet-v1-1_fp16_safetensors", "control_v11p_sd15_canny_fp16.safetensors",
                "controlnet"),
    "pixel_lora": hf("artificialguybr/pixelartredmond-1-5v-pixel-art-loras-for-sd-1-5",
                     "PixelArtRedmond15V-PixelArt-PIXARFK.safetensors", "loras"),
    "ipadapter_sd15": hf("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", "ipadapter"),
    "clip_vision_h": hf("h94/IP-Adapter", "models/image_encoder/model.safetensors", "clip_vision",
                        name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    **{f"dc_{k}": hf("7eu7d7/ConvFusion", f"ConvFusion-{k}-mjv5.safetensors", "deltaconv")
       for k in ("sd15", "sdxl", "pixart1024")},
}


# --- compact descriptions ------------------------------------------------------------------------------------

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


def distill(model, latents, prefix):
    return {
        "distill": N("DeltaConvDistill", color="purple", model=model, latents=latents, positive=("pos", 0),
                     negative=("neg", 0), stage="A: block-local", steps=2000, learning_rate=3e-4, batch_size=4,
                     seed=Seed(0, "fixed"), save_every=500, filename_prefix=prefix, warmup_steps=500,
                     grad_accumulation=1, training_dtype="bf16", gradient_checkpointing=False, min_snr_gamma=0.0,
                     kernel_preset="", allow_cpu=False),
        "dc_save": N("DeltaConvSave", color="purple", deltaconv=("distill", 0), filename=prefix, overwrite=False),
        "loss": N("LossGraphNode", loss=("distill", 1), filename_prefix=f"{prefix}_loss"),
        # try the new blocks right away: the same model, patched with what was just learned
        "dc_patch": N("DeltaConvPatch", "ΔConv Patch (student)", "purple", model=model, deltaconv=("distill", 0),
                      start_percent=0.0, end_percent=1.0, levels="all", strict=False),
        "try_latent": N("EmptyLatentImage", width=512, height=512, batch_size=1),
        "try": sampler(("dc_patch", 0), ("try_latent", 0), Seed(7, "fixed"), steps=20, title="KSampler (student)"),
        "try_decode": N("VAEDecode", samples=("try", 0), vae=("ckpt", 2)),
        "try_preview": N("PreviewImage", images=("try_decode", 0)),
    }


WORKFLOWS = {}


def workflow(fn):
    WORKFLOWS[fn.__name__] = fn
    return fn


@workflow
def deltaconv_sd15_txt2img_compare():
    g = sd15_base(size=768)
    g |= {"ks_attn": sampler(("ckpt", 0), ("latent", 0), Seed(123456789, "fixed"), title="KSampler (attention)"),
          "ks_dc": sampler(("dc_patch", 0), ("latent", 0), Seed(123456789, "fixed"), title="KSampler (ΔConv)"),
          **output(("ks_attn", 0), ("ckpt", 2), "deltaconv_compare/attention", "_attn"),
          **output(("ks_dc", 0), ("ckpt", 2), "deltaconv_compare/deltaconv", "_dc")}
    return ("SD1.5 · attention vs ΔConv, same seed", g,
            "Same prompt, same seed, two samplers: the plain model (self-attention) and the ΔConv-patched clone. "
            "Both seeds are fixed: change them together. Compare the two images and the two sampler times in the "
            "console.\nModels: DreamShaper 8 (the checkpoint the SD1.5 ΔConv blocks were distilled from) in "
            "models/checkpoints; ConvFusion-sd15-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_compare_psnr_ssim():
    g = sd15_base(pos="a red vintage bicycle leaning against a sunlit brick wall, flowers in the basket, photograph")
    g |= {"compare": N("DeltaConvCompare", color="purple", model=("ckpt", 0), patched_model=("dc_patch", 0),
                       vae=("ckpt", 2), positive=("pos", 0), negative=("neg", 0), latent_image=("latent", 0),
                       seed=Seed(123456789, "fixed"), steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras",
                       denoise=1.0),
          "save_original": N("SaveImage", "Original (attention)", images=("compare", 0),
                             filename_prefix="deltaconv_compare/original"),
          "save_patched": N("SaveImage", "Patched (ΔConv)", images=("compare", 1),
                            filename_prefix="deltaconv_compare/deltaconv"),
          "heat_map": N("PreviewImage", "Difference heat map", images=("compare", 2))}
    return ("SD1.5 · ΔConv Compare: PSNR, SSIM, heat map", g,
            "ΔConv Compare samples the original model and the ΔConv-patched clone from the same seed and settings "
            "(as KSampler does), decodes both and measures what the patch costs on your prompt: PSNR and SSIM per "
            "image, a heat map of the per-pixel difference (its scale is in the report) and both sampling times. "
            "The report is printed to the console and is the node's report output.\nModels: DreamShaper 8 in "
            "models/checkpoints; ConvFusion-sd15-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sdxl_txt2img():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("sdxl")),
         **prompts(("ckpt", 1), "a lighthouse on a cliff above a stormy sea, dramatic clouds, golden hour, "
                                "cinematic photograph"),
         "latent": N("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         **deltaconv(("ckpt", 0), "dc_sdxl"),
         "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42)), **output(("ks", 0), ("ckpt", 2), "deltaconv_sdxl")}
    return ("SDXL · ΔConv txt2img 1024²", g,
            "SDXL base 1.0 with every self-attention layer replaced by ΔConv blocks.\nModels: sd_xl_base_1.0 in "
            "models/checkpoints; ConvFusion-sdxl-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_pixart_sigma_txt2img():
    text = "a red fox curled up asleep in autumn leaves, soft morning light, detailed fur"
    g = {"unet": N("UNETLoader", unet_name=Model("pixart"), weight_dtype="default"),
         "clip": N("CLIPLoader", clip_name=Model("t5xxl"), type="pixart", device="default"),
         "vae": N("VAELoader", vae_name=Model("sdxl_vae")),
         "pos": N("CLIPTextEncodePixArtAlpha", "Positive", "green", width=1024, height=1024, text=text,
                  clip=("clip", 0)),
         "neg": N("CLIPTextEncodePixArtAlpha", "Negative", "red", width=1024, height=1024, text=NEG,
                  clip=("clip", 0)),
         "latent": N("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         **deltaconv(("unet", 0), "dc_pixart1024"),
         "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), steps=20, cfg=4.5, sampler_name="euler",
                       scheduler="normal"),
         **output(("ks", 0), ("vae", 0), "deltaconv_pixart")}
    return ("PixArt-Σ · ΔConv txt2img 1024²", g,
            "PixArt-Σ-XL-2-1024-MS with all 28 self-attention layers replaced by ΔConv blocks (needs ComfyUI with "
            "PixArt support, 2025 on).\nModels: PixArt-Sigma-XL-2-1024-MS (the diffusers transformer file, renamed) "
            "in models/diffusion_models; t5xxl_fp16 in models/text_encoders; sdxl_vae in models/vae; "
            "ConvFusion-pixart1024-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_controlnet():
    g = sd15_base(pos="a futuristic glass house in a lush garden, architectural photograph")
    g |= {"image": N("LoadImage", image="example.png"),
          "canny": N("Canny", image=("image", 0), low_threshold=0.4, high_threshold=0.8),
          "canny_preview": N("PreviewImage", images=("canny", 0)),
          "cn": N("ControlNetLoader", control_net_name=Model("canny")),
          "cn_apply": N("ControlNetApplyAdvanced", positive=("pos", 0), negative=("neg", 0), control_net=("cn", 0),
                        image=("canny", 0), strength=1.0, start_percent=0.0, end_percent=1.0),
          "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), pos=("cn_apply", 0), neg=("cn_apply", 1)),
          **output(("ks", 0), ("ckpt", 2), "deltaconv_controlnet")}
    return ("SD1.5 · ΔConv + ControlNet (canny)", g,
            "ControlNet works through cross-attention and the UNet's residuals, so it combines with the "
            "ΔConv-patched model unchanged. Load your own image; its edges steer the composition.\nModels: "
            "DreamShaper 8; control_v11p_sd15_canny_fp16 in models/controlnet; ConvFusion-sd15-mjv5.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_ipadapter():
    g = sd15_base(pos="a portrait of a woman in a garden, soft light, best quality")
    g |= {"image": N("LoadImage", "Reference image", image="example.png"),
          "ipa_loader": N("IPAdapterUnifiedLoader", model=("dc_patch", 0), preset="STANDARD (medium strength)"),
          "ipa": N("IPAdapter", model=("ipa_loader", 0), ipadapter=("ipa_loader", 1), image=("image", 0), weight=0.8,
                   start_at=0.0, end_at=1.0, weight_type="standard"),
          "ks": sampler(("ipa", 0), ("latent", 0), Seed(42)), **output(("ks", 0), ("ckpt", 2), "deltaconv_ipadapter")}
    g["ipa_loader"]["models"] = [MODELS["ipadapter_sd15"], MODELS["clip_vision_h"]]
    return ("SD1.5 · ΔConv + IP-Adapter", g,
            "IP-Adapter (cubiq/ComfyUI_IPAdapter_plus, install it with ComfyUI-Manager) injects the reference image "
            "through cross-attention, which ΔConv leaves alone: patch first, then apply IP-Adapter.\nModels: "
            "DreamShaper 8; ip-adapter_sd15 in models/ipadapter and CLIP-ViT-H-14-laion2B-s32B-b79K in "
            "models/clip_vision (the STANDARD preset); ConvFusion-sd15-mjv5.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_inpaint():
    g = sd15_base("dreamshaper_inpaint", pos="a vase of sunflowers on the table, oil painting")
    del g["latent"]
    g |= {"image": N("LoadImage", "Image + mask (mask editor)", image="example.png"),
          "encode": N("VAEEncodeForInpaint", pixels=("image", 0), vae=("ckpt", 2), mask=("image", 1), grow_mask_by=6),
          "ks": sampler(("dc_patch", 0), ("encode", 0), Seed(42)),
          **output(("ks", 0), ("ckpt", 2), "deltaconv_inpaint")}
    return ("SD1.5 inpainting · ΔConv", g,
            "Inpainting with an SD1.5 inpainting checkpoint (9-channel UNet), patched with ΔConv. Draw the mask on "
            "the Load Image node (right click → Open in MaskEditor).\nModels: DreamShaper 8 INPAINTING in "
            "models/checkpoints; ConvFusion-sd15-mjv5 (distilled from DreamShaper 8: same layers; distill your own "
            "blocks for the inpainting model for best results).\n" + DC_NOTE)


@workflow
def deltaconv_sd15_lora():
    g = sd15_base(pos="Pixel Art, PixArFK, a knight resting by a campfire in a forest at night")
    g |= {"lora": N("LoraLoader", model=("ckpt", 0), clip=("ckpt", 1), lora_name=Model("pixel_lora"),
                    strength_model=1.0, strength_clip=1.0),
          "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42)), **output(("ks", 0), ("ckpt", 2), "deltaconv_lora")}
    g["pos"]["inputs"]["clip"] = g["neg"]["inputs"]["clip"] = ("lora", 1)
    g["dc_patch"]["inputs"]["model"] = ("lora", 0)
    return ("SD1.5 · LoRA → ΔConv Patch", g,
            "Load the LoRA first, then patch. LoRA weights on the replaced self-attention layers have no effect while "
            "ΔConv runs (the patch report counts them); all others apply as usual.\nModels: DreamShaper 8; "
            "PixelArtRedmond15V (trigger words: Pixel Art, PixArFK) in models/loras; ConvFusion-sd15-mjv5.\n"
            + DC_NOTE)


@workflow
def deltaconv_sdxl_hires_2048():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("sdxl")),
         **prompts(("ckpt", 1), "an overgrown ancient temple in a jungle valley, waterfalls, aerial view, intricate "
                                "detail, 8k photograph"),
         "latent": N("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         **deltaconv(("ckpt", 0), "dc_sdxl"),
         "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), title="KSampler 1024²"),
         "upscale": N("LatentUpscaleBy", samples=("ks", 0), upscale_method="nearest-exact", scale_by=2.0),
         "ks_hires": sampler(("dc_patch", 0), ("upscale", 0), Seed(43), steps=20, denoise=0.5,
                             title="KSampler 2048² (denoise 0.5)"),
         **output(("ks_hires", 0), ("ckpt", 2), "deltaconv_hires_2048")}
    return ("SDXL hires fix 2048² · ΔConv both passes", g,
            "Two-pass hires fix: 1024² → latent ×2 → 2048² at denoise 0.5, both passes on the ΔConv-patched "
            "model. "
            "At 2048² self-attention dominates the cost; this is where ΔConv's linear cost pays most.\nModels: "
            "sd_xl_base_1.0; ConvFusion-sdxl-mjv5.\n" + DC_NOTE)


@workflow
def deltaconv_distill_data_free():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("dreamshaper")),
         **prompts(("ckpt", 1), "a beautiful landscape, a portrait, an animal, a city street, best quality", ""),
         "latent": N("EmptyLatentImage", width=512, height=512, batch_size=8),
         "teacher": sampler(("ckpt", 0), ("latent", 0), Seed(1, "fixed"), steps=20, title="Teacher samples"),
         **distill(("ckpt", 0), ("teacher", 0), "my_sd15_deltaconv")}
    return ("ΔConv Distill · data-free (teacher samples)", g,
            "Trains ΔConv blocks for your own checkpoint with no dataset: the model's own samples are the training "
            "latents. Stage A (block-local) is cheap; stage B (end-to-end) is the paper's recipe. Blocks are saved "
            "to models/deltaconv (ΔConv Save), checkpoints to output/deltaconv every save_every steps; connect a "
            "checkpoint (ΔConv Load) as deltaconv to resume. Needs a GPU (allow_cpu for tests only).\nModels: any "
            "SD1.x/SDXL/PixArt checkpoint (DreamShaper 8 here).")


@workflow
def deltaconv_distill_image_folder():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("dreamshaper")),
         **prompts(("ckpt", 1), "best quality photograph", ""),
         "images": N("LoadImageSetFromFolderNode", folder="deltaconv_training", resize_method="Stretch"),
         "resize": N("ImageScale", image=("images", 0), upscale_method="lanczos", width=512, height=512,
                     crop="center"),
         "encode": N("VAEEncode", pixels=("resize", 0), vae=("ckpt", 2)),
         **distill(("ckpt", 0), ("encode", 0), "my_sd15_deltaconv_images")}
    return ("ΔConv Distill · image folder", g,
            "Trains ΔConv blocks on your images: put them in ComfyUI/input/deltaconv_training, they are resized to "
            "512², VAE-encoded and used as training latents with one caption. For large runs (captions per image, "
            "several GPUs) use scripts/distill.py.\nModels: any SD1.x/SDXL/PixArt checkpoint (DreamShaper 8 here).")


# --- UI format ------------------------------------------------------------------------------------------------

COLORS = {"purple": ("#323", "#535"), "green": ("#232", "#353"), "red": ("#322", "#533"), "note": ("#432", "#653")}


def schema_inputs(schema):
    """[(name, spec, required)] in the order the frontend builds widgets and sockets."""
    order = schema.get("input_order") or {k: list(v) for k, v in schema["input"].items()}
    return [(name, schema["input"][section][name], section == "required")
            for section in ("required", "optional") for name in order.get(section, [])]


def is_widget(spec):
    opts = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def widget_values(name, spec, value):
    opts = spec[1] if len(spec) > 1 else {}
    values = [value]
    if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
        values.append(getattr(value, "control", "randomize"))
    if opts.get("image_upload"):
        values.append("image")
    return values


def default(spec):
    opts = spec[1] if len(spec) > 1 else {}
    if "default" in opts:
        return opts["default"]
    return spec[0][0] if isinstance(spec[0], list) and spec[0] else None


def node_size(schema, sockets, n_widgets, class_type):
    width = 400 if class_type.startswith("CLIPTextEncode") else 315
    height = 30 + 22 * max(len(sockets), len(schema["output"]), 1) + 24 * n_widgets
    height += sum(80 for _, spec, _ in schema_inputs(schema) if spec[0] == "STRING" and is_widget(spec)
                  and (spec[1] if len(spec) > 1 else {}).get("multiline"))
    if class_type in ("LoadImage", "SaveImage", "PreviewImage"):
        height += 240
    return [width, height]


def layout(keys, links):
    """Columns by graph depth (sources as late as their first consumer allows), rows by the barycentre of neighbours."""
    srcs = {k: [s for s, _, t in links if t == k] for k in keys}
    dsts = {k: [t for s, _, t in links if s == k] for k in keys}
    depth = {}

    def d(k):
        if k not in depth:
            depth[k] = 1 + max((d(s) for s in srcs[k]), default=-1)
        return depth[k]

    for k in keys:
        d(k)
    for k in keys:  # loaders and empty latents sit right before their first consumer
        if not srcs[k] and dsts[k]:
            depth[k] = min(depth[t] for t in dsts[k]) - 1
    cols = {}
    for k in keys:
        cols.setdefault(depth[k], []).append(k)
    rank = {k: i for i, k in enumerate(keys)}
    for _ in range(2):
        for c in sorted(cols):
            def bary(k):
                near = [rank[s] for s in srcs[k] if depth[s] < c] + [rank[t] for t in dsts[k] if depth[t] > c]
                return sum(near) / len(near) if near else rank[k]
            cols[c].sort(key=lambda k: (bary(k), rank[k]))
            for i, k in enumerate(cols[c]):
                rank[k] = i + c * 0.001
    return depth, cols


def to_ui(name, title, graph, note, info, versions):
    """Compact description → (UI workflow, API prompt)."""
    keys = list(graph)
    ids = {k: i + 2 for i, k in enumerate(keys)}  # id 1 is the note
    api, nodes = {}, {}
    links = [(v[0], v[1], k) for k in keys for v in graph[k]["inputs"].values() if isinstance(v, tuple)]
    depth, cols = layout(keys, links)
    order = {k: i for i, k in enumerate(sorted(keys, key=lambda k: (depth[k], keys.index(k))))}
    ui_links = []
    for k in keys:
        node, schema = graph[k], info[graph[k]["class_type"]]
        unknown = set(node["inputs"]) - {n for n, _, _ in schema_inputs(schema)}
        if unknown:
            raise SystemExit(f"{name}/{k}: {node['class_type']} has no input(s) {sorted(unknown)}")
        inputs, widgets, api_inputs = [], [], {}
        for iname, spec, required in schema_inputs(schema):
            value = node["inputs"].get(iname)
            if is_widget(spec):
                if isinstance(value, tuple):
                    raise SystemExit(f"{name}/{k}: {iname} is a widget; links into widgets are not supported here")
                value = default(spec) if value is None else value
                widgets += widget_values(iname, spec, value)
                api_inputs[iname] = value
            else:
                if value is None and required:
                    raise SystemExit(f"{name}/{k}: required input {iname} is not connected")
                inputs.append({"name": iname, "type": spec[0], "link": None})
                if value is not None:
                    api_inputs[iname] = [str(ids[value[0]]), value[1]]
                    ui_links.append([len(ui_links) + 1, ids[value[0]], value[1], ids[k], len(inputs) - 1,
                                     spec[0], inputs[-1]])
        category = schema.get("category", "")
        cnr = ("deltaconv" if node["class_type"].startswith("DeltaConv") else
               CNR_IDS.get(category.split("/")[0], "comfy-core"))
        props = {"Node name for S&R": node["class_type"], "cnr_id": cnr}
        ver = {"deltaconv": versions.get("deltaconv"), "comfy-core": versions.get("comfy-core")}.get(
            cnr, THIRD_PARTY_VERSIONS.get(cnr))
        if ver:
            props["ver"] = ver
        models = node.get("models") or [m for v in node["inputs"].values() for m in getattr(v, "models", [])]
        if models:
            props["models"] = models
        ui = {"id": ids[k], "type": node["class_type"], "pos": [0, 0],
              "size": node_size(schema, inputs, len(widgets), node["class_type"]), "flags": {}, "order": order[k] + 1,
              "mode": 0, "inputs": inputs,
              "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                          for i, (t, n) in enumerate(zip(schema["output"], schema["output_name"]))],
              "properties": props, "widgets_values": widgets}
        if node.get("title"):
            ui["title"] = node["title"]
        if node.get("color"):
            ui["color"], ui["bgcolor"] = COLORS[node["color"]]
        nodes[k] = ui
        api[str(ids[k])] = {"inputs": api_inputs, "class_type": node["class_type"],
                            "_meta": {"title": node.get("title") or schema.get("display_name") or node["class_type"]}}
    by_id = {n["id"]: n for n in nodes.values()}
    for link in ui_links:
        link[6]["link"] = link[0]
        by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
        del link[6]
    # positions: a note column, then one column per depth
    x = 40
    note_node = {"id": 1, "type": "Note", "pos": [x, 40], "size": [320, 420], "flags": {}, "order": 0, "mode": 0,
                 "inputs": [], "outputs": [], "title": title, "properties": {}, "widgets_values": [note],
                 "color": COLORS["note"][0], "bgcolor": COLORS["note"][1]}
    x += 320 + 60
    for c in sorted(cols):
        y = 40
        for k in cols[c]:
            nodes[k]["pos"] = [x, y]
            y += nodes[k]["size"][1] + 50
        x += max(nodes[k]["size"][0] for k in cols[c]) + 60
    height = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    scale = round(min(1.0, 1800 / x, 1000 / height), 3)
    ui_nodes = [note_node] + [nodes[k] for k in keys]
    wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"deltaconv/{name}")), "revision": 0,
          "last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(ui_links),
          "nodes": ui_nodes, "links": ui_links, "groups": [], "config": {},
          # every model once more at the top: the frontend lists a node's models only when a widget names the file
          "models": list({m["url"]: m for n in ui_nodes for m in n["properties"].get("models", [])}.values()),
          "extra": {"ds": {"scale": scale, "offset": [0, 0]}, "frontendVersion": FRONTEND_VERSION}, "version": 0.4}
    return wf, api


# --- thumbnail ------------------------------------------------------------------------------------------------

LINK_COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
               "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "MASK": "#81c784", "DELTACONV": "#c77dff",
               "CONTROL_NET": "#00d6a3", "LOSS_MAP": "#e0e0e0", "IPADAPTER": "#7bd4ff"}


def thumbnail(wf, title, info, path, size=(512, 384), ss=2):
    """A schematic of the graph: the UI's columns and rows as equal boxes, wires coloured by type, ΔConv outlined."""
    from PIL import Image, ImageDraw, ImageFont

    def font(px, bold=False):
        name = f"DejaVuSans{'-Bold' if bold else ''}.ttf"
        for f in (name, f"/usr/share/fonts/truetype/dejavu/{name}"):
            try:
                return ImageFont.truetype(f, px * ss)
            except OSError:
                pass
        return ImageFont.load_default(px * ss)

    W, H = size[0] * ss, size[1] * ss
    img = Image.new("RGB", (W, H), "#1b1b1f")
    draw = ImageDraw.Draw(img)
    draw.text((14 * ss, 10 * ss), title, fill="#f2f2f2", font=font(17, True))
    draw.text((14 * ss, 34 * ss), "ComfyUI-DeltaConv example workflow", fill="#c77dff", font=font(11))
    nodes = [n for n in wf["nodes"] if n["type"] != "Note"]
    xs = sorted({n["pos"][0] for n in nodes})
    cols = [sorted((n for n in nodes if n["pos"][0] == x), key=lambda n: n["pos"][1]) for x in xs]
    top, pad, gap = 62 * ss, 12 * ss, 10 * ss
    rows = max(len(c) for c in cols)
    bw = (W - 2 * pad - gap * (len(cols) - 1)) / len(cols)
    bh = min(44 * ss, (H - top - pad - gap * (rows - 1)) / rows)
    boxes = {}
    for c, col in enumerate(cols):
        y = top + ((H - top - pad) - (len(col) * bh + (len(col) - 1) * gap)) / 2
        for n in col:
            boxes[n["id"]] = (pad + c * (bw + gap), y, pad + c * (bw + gap) + bw, y + bh)
            y += bh + gap
    for _, a, a_slot, b, b_slot, kind in wf["links"]:
        (_, ay, ax, ay1), (bx, by, _, by1) = boxes[a][:4], boxes[b][:4]
        n_out = max(len(next(n for n in nodes if n["id"] == a)["outputs"]), 1)
        n_in = max(len(next(n for n in nodes if n["id"] == b)["inputs"]), 1)
        p0 = (ax, ay + (ay1 - ay) * (a_slot + 1) / (n_out + 1))
        p3 = (bx, by + (by1 - by) * (b_slot + 1) / (n_in + 1))
        dx = max((p3[0] - p0[0]) * 0.5, 12 * ss)
        pts = [tuple((1 - t) ** 3 * p0[j] + 3 * (1 - t) ** 2 * t * (p0[j] + (dx if j == 0 else 0))
                     + 3 * (1 - t) * t ** 2 * (p3[j] - (dx if j == 0 else 0)) + t ** 3 * p3[j] for j in range(2))
               for t in (i / 40 for i in range(41))]
        draw.line(pts, fill=LINK_COLORS.get(kind, "#aaaaaa"), width=int(1.6 * ss), joint="curve")
    label_font = font(8 if bw < 60 * ss else 9)
    for n in nodes:
        x, y, xe, ye = boxes[n["id"]]
        ours = n["properties"].get("cnr_id") == "deltaconv"
        draw.rounded_rectangle((x, y, xe, ye), radius=4 * ss, fill=n.get("bgcolor") or "#3a3a3f",
                               outline="#c77dff" if ours else "#6a6a74", width=(2 if ours else 1) * ss)
        label = n.get("title") or info.get(n["type"], {}).get("display_name") or n["type"]
        words, lines = label.split(), [""]
        for w in words:  # wrap into the box, two lines at most
            trial = f"{lines[-1]} {w}".strip()
            if draw.textlength(trial, font=label_font) <= xe - x - 6 * ss or not lines[-1]:
                lines[-1] = trial
            elif len(lines) < 2:
                lines.append(w)
            else:
                lines[-1] += " …"
                break
        for i, line in enumerate(lines):
            while len(line) > 1 and draw.textlength(line, font=label_font) > xe - x - 6 * ss:
                line = line[:-2] + "…"
            draw.text((x + 3 * ss, y + 3 * ss + i * 11 * ss), line, fill="#ececec", font=label_font)
    img.resize(size, Image.LANCZOS).save(path, "JPEG", quality=90, optimize=True)


# --- schemas and main -----------------------------------------------------------------------------------------

def third_party_schemas():
    if TESTS not in sys.path:
        sys.path.append(TESTS)
    from test_workflows import THIRD_PARTY  # kept next to the tests that check workflows against it

    return THIRD_PARTY


def pack_version():
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


def build_all(object_info, comfyui_version=None):
    """{name: (title, UI workflow, API prompt)} for every workflow, from a ComfyUI /object_info."""
    info = {**third_party_schemas(), **object_info}
    versions = {"deltaconv": pack_version(), "comfy-core": comfyui_version}
    out = {}
    for name, fn in WORKFLOWS.items():
        title, graph, note = fn()
        missing = sorted({n["class_type"] for n in graph.values()} - set(info))
        if missing:
            raise SystemExit(f"{name}: this ComfyUI has no {missing}; generate against a newer one (COMFYUI_PATH)")
        wf, api = to_ui(name, title, graph, note, info, versions)
        out[name] = (title, wf, api)
    return out


def fetch_object_info(comfy_path):
    from devkit.comfy_server import ComfyServer

    base = tempfile.mkdtemp(prefix="deltaconv_wf_")
    server = ComfyServer(comfy_path, {"base": base}, pack_dir=REPO)
    try:
        server.start()
        info = server.get("/object_info")
        version = server.get("/system_stats").get("system", {}).get("comfyui_version")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return info, version


def dump(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--object-info", help="a saved /object_info JSON (else a headless ComfyUI is started)")
    p.add_argument("--comfyui-version", help="ComfyUI version for properties.ver with --object-info")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--save-object-info", help="also write the fetched /object_info here")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if args.object_info:
        with open(args.object_info) as f:
            info, version = json.load(f), args.comfyui_version
    elif args.comfyui:
        info, version = fetch_object_info(args.comfyui)
        if args.save_object_info:
            with open(args.save_object_info, "w") as f:
                json.dump(info, f)
    else:
        p.error("give --object-info FILE or a ComfyUI checkout (--comfyui / COMFYUI_PATH)")
    built = build_all(info, version)
    os.makedirs(os.path.join(args.out, "api"), exist_ok=True)
    for name, (title, wf, api) in built.items():
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            f.write(dump(wf))
        with open(os.path.join(args.out, "api", f"{name}.api.json"), "w") as f:
            f.write(dump(api))
        thumbnail(wf, title, {**third_party_schemas(), **info}, os.path.join(args.out, f"{name}.jpg"))
        print(f"{name}: {len(wf['nodes'])} nodes, {len(wf['links'])} links")


if __name__ == "__main__":
    main()
