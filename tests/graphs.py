"""API-format prompts for the end-to-end tests (what `POST /prompt` takes)."""
import copy

# (file, conditioning dims, pooled dims, image size in pixels) per tiny model; PixArt needs ≥ 264 px.
MODELS = {
    "sd15": ("tiny_sd15.safetensors", 768, 0, 64),
    "sdxl": ("tiny_sdxl.safetensors", 2048, 1280, 64),
    "pixart": ("tiny_pixart.safetensors", 4096, 0, 320),
    "wan": ("tiny_wan.safetensors", 4096, 0, 64),
}
# Video models sample a video latent: Wan's 16 channels, 9 frames → 3 latent frames of 8 × 12 (tokens: 3 × 4 × 6).
VIDEO_LATENTS = {"wan": {"class_type": "EmptyHunyuanLatentVideo",
                         "inputs": {"width": 96, "height": 64, "length": 9, "batch_size": 1}}}


def txt2img(family="sd15", weights=None, seed=1, steps=3, start=0.0, end=1.0, levels="all", strict=False,
            extra_models=(), decode=False, unet_inputs=None):
    """UNETLoader → [ΔConv Load + Patch] → KSampler → digest (and VAE decode + SaveImage when asked).

    `extra_models` adds more KSampler branches on the same loader: (suffix, weights or None) pairs.
    """
    unet, dim, pooled, size = MODELS[family]
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, **(unet_inputs or {})}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 11, "tokens": 16, "dim": dim,
                                                                      "pooled_dim": pooled}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 12, "tokens": 16, "dim": dim,
                                                                      "pooled_dim": pooled}},
        "latent": copy.deepcopy(VIDEO_LATENTS.get(family)) or {
            "class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }
    for suffix, w in (("", weights), *extra_models):
        model = ["unet", 0]
        if w is not None:
            g[f"load{suffix}"] = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": w}}
            g[f"patch{suffix}"] = {"class_type": "DeltaConvPatch", "inputs": {
                "model": ["unet", 0], "deltaconv": [f"load{suffix}", 0], "start_percent": start,
                "end_percent": end, "levels": levels, "strict": strict}}
            model = [f"patch{suffix}", 0]
        g[f"sampler{suffix}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}}
        g[f"digest{suffix}"] = {"class_type": "DeltaConvTestDigest",
                                "inputs": {"samples": [f"sampler{suffix}", 0], "model": model}}
    if decode:
        g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl" if family != "sd15" else "taesd"}}
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
        g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "deltaconv_e2e"}}
    return g


def with_model_node(graph, class_type, inputs, name="extra"):
    """Insert a MODEL → MODEL node right after the loader (before any ΔConv patch or sampler)."""
    graph[name] = {"class_type": class_type, "inputs": {"model": ["unet", 0], **inputs}}
    for node in graph.values():
        if node is graph[name]:
            continue
        for key, value in node["inputs"].items():
            if value == ["unet", 0]:
                node["inputs"][key] = [name, 0]
    return graph


def digest(entry, suffix=""):
    return entry["outputs"][f"digest{suffix}"]["digest"][0]
