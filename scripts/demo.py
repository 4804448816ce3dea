"""Run a ΔConv-patched txt2img workflow through a real headless ComfyUI and compare it with the unpatched model.

With no --checkpoint, an embedded default model is generated: a small randomly initialised SD1.5-architecture
UNet (320 channels, two resolution levels), a random CLIP-L and a random TAESD, plus untrained ΔConv blocks.
Its images are noise; it shows the pipeline and the timing. Give a real checkpoint and ΔConv file for real images.

    .venv/bin/python scripts/demo.py [--checkpoint sd15.safetensors --deltaconv ConvFusion-sd15-mjv5.safetensors]
"""
import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

from devkit.comfy_env import REPO, load_pack, setup_comfy

DEFAULT_UNET = "deltaconv_demo_sd15.safetensors"
DEFAULT_BLOCKS = "deltaconv_demo_sd15_untrained.safetensors"
DEFAULT_CLIP = "deltaconv_demo_clip_l.safetensors"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="a ComfyUI folder (default: $COMFYUI_PATH, else the ComfyUI whose "
                   "custom_nodes folder holds this pack)")
    p.add_argument("--checkpoint", help="an SD1.x/SD2.x/SDXL checkpoint (.safetensors); default: embedded model")
    p.add_argument("--deltaconv", help="ΔConv weights for that checkpoint (official release or our format)")
    p.add_argument("--prompt", default="a photograph of a lighthouse on a cliff at sunset, detailed")
    p.add_argument("--negative", default="blurry, low quality")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", default=os.path.join(REPO, "demo_output"))
    p.add_argument("--workdir", default=os.path.join(REPO, ".cache", "demo"))
    return p.parse_args()


def link(src, folder, name=None):
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, name or os.path.basename(src))
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(os.path.abspath(src), dst)
    return os.path.basename(dst)


EMBEDDED_COMPLETE = ".complete-v2"  # written last, inside the folder that is then renamed into place


def write_embedded_models(folder):
    """The default model set, in ComfyUI's folder layout under `folder`."""
    import comfy.sd1_clip
    import torch
    from safetensors.torch import save_file

    from deltaconv_core.families import find_attention_sites
    from deltaconv_core.weights import DeltaConvWeights, save_weights
    from devkit.tiny_models import SD15_TINY, build_taesd, build_unet, init_random

    def save(state, *path):
        os.makedirs(os.path.join(folder, *path[:-1]), exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, *path))

    with torch.no_grad():  # older ComfyUI fills CLIP's projection in place while building it
        unet = build_unet(SD15_TINY, seed=1)
        save({k: v.half() for k, v in unet.state_dict().items()}, "unet", DEFAULT_UNET)
        os.makedirs(os.path.join(folder, "deltaconv"))
        save_weights(DeltaConvWeights.fresh(find_attention_sites(unet), seed=1),
                     os.path.join(folder, "deltaconv", DEFAULT_BLOCKS))
        clip = init_random(comfy.sd1_clip.SDClipModel().transformer, seed=2)
        save({k: v.half() for k, v in clip.state_dict().items()}, "clip", DEFAULT_CLIP)
        taesd = build_taesd(seed=3)
        for part in ("encoder", "decoder"):
            save(getattr(taesd, f"taesd_{part}").state_dict(), "vae_approx", f"taesd_{part}.safetensors")
    open(os.path.join(folder, EMBEDDED_COMPLETE), "w").close()


def embedded_models(models_dir):
    """Generate the default model set once; returns (unet, clip, blocks) file names.

    It is built in a temporary folder that is renamed into place when complete, so a crash or Ctrl-C at any point
    leaves either no set or a whole one; an incomplete folder from an older version is rebuilt.
    """
    parent = os.path.dirname(models_dir)
    for stale in glob.glob(os.path.join(parent, "models.partial-*")):
        shutil.rmtree(stale, ignore_errors=True)
    if not os.path.exists(os.path.join(models_dir, EMBEDDED_COMPLETE)):
        print("Generating the embedded default model (random weights, SD1.5 architecture)…", flush=True)
        os.makedirs(parent, exist_ok=True)
        partial = tempfile.mkdtemp(prefix="models.partial-", dir=parent)
        write_embedded_models(partial)
        shutil.rmtree(models_dir, ignore_errors=True)
        os.replace(partial, models_dir)
    return DEFAULT_UNET, DEFAULT_CLIP, DEFAULT_BLOCKS


def graph(args, loaders, refs, blocks, prefix):
    g = dict(loaders)
    model = refs["model"]
    if blocks:
        g["load"] = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": blocks}}
        g["patch"] = {"class_type": "DeltaConvPatch", "inputs": {
            "model": model, "deltaconv": ["load", 0], "start_percent": 0.0, "end_percent": 1.0, "levels": "all",
            "strict": False}}
        model = ["patch", 0]
    g.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": args.prompt, "clip": refs["clip"]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": args.negative, "clip": refs["clip"]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size,
                                                                "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": refs["vae"]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    })
    return g


def timed_run(server, g):
    """Seconds for one run after a one-step warm-up run (model loading excluded); returns (seconds, image path)."""
    sampler = g["sampler"]["inputs"]
    server.run({**g, "sampler": {**g["sampler"], "inputs": {**sampler, "steps": 1, "seed": sampler["seed"] + 1}}},
               timeout=3600)  # another seed: the timed run then executes instead of coming from ComfyUI's cache
    start = time.perf_counter()
    entry = server.run(g, timeout=3600)
    seconds = time.perf_counter() - start
    image = entry["outputs"]["save"]["images"][0]
    return seconds, os.path.join(server.base, "output", image["subfolder"], image["filename"])


def model_setup(args, models_dir):
    """Loader nodes, references to their MODEL/CLIP/VAE outputs, and the ΔConv file name."""
    if args.checkpoint:
        if not args.deltaconv:
            sys.exit("--checkpoint needs --deltaconv: blocks made for that model (see weights/README.md, or "
                     "distill them with the ΔConv Distill node)")
        name = link(args.checkpoint, os.path.join(models_dir, "checkpoints"))
        loaders = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}}
        refs = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2]}
        return loaders, refs, link(args.deltaconv, os.path.join(models_dir, "deltaconv"))
    unet, clip, blocks = embedded_models(models_dir)
    loaders = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet}},
               "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "stable_diffusion"}},
               "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}}
    refs = {"model": ["unet", 0], "clip": ["clip", 0], "vae": ["vae", 0]}
    if args.deltaconv:
        blocks = link(args.deltaconv, os.path.join(models_dir, "deltaconv"))
    return loaders, refs, blocks


def main():
    args = parse_args()
    import torch

    comfy_path = setup_comfy(args.comfyui, cpu=not torch.cuda.is_available())
    load_pack()
    from devkit.comfy_server import ComfyServer

    models_dir = os.path.join(args.workdir, "models")
    loaders, refs, blocks = model_setup(args, models_dir)
    server = ComfyServer(comfy_path, {"base": args.workdir}, pack_dir=REPO, cpu=not torch.cuda.is_available())
    server.start()
    try:
        if ("unet" in loaders
                and "weight_dtype" in server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]):
            loaders["unet"]["inputs"]["weight_dtype"] = "default"
        results = {label: timed_run(server, graph(args, loaders, refs, b, f"deltaconv_demo_{label}"))
                   for label, b in (("unpatched", None), ("patched", blocks))}
        report = [line.split("ΔConv: ", 1)[1] for line in server.log_text().splitlines() if "ΔConv: " in line]
    finally:
        server.stop()

    os.makedirs(args.output, exist_ok=True)
    print("\n".join(["", "ΔConv patch report:"] + [f"  {r}" for r in dict.fromkeys(report)]))
    print(f"\n{args.size}x{args.size}, {args.steps} steps, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"ComfyUI at {comfy_path}")
    for label, (seconds, image) in results.items():
        dst = shutil.copy(image, os.path.join(args.output, os.path.basename(image)))
        print(f"  {label:>9}: {seconds:7.2f} s   {dst}")
    print(f"  speed-up: {results['unpatched'][0] / results['patched'][0]:.2f}x (whole run: sampling and VAE decode)")


if __name__ == "__main__":
    main()
