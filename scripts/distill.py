"""Headless ΔConv distillation for large runs: ComfyUI as a library, one GPU or many with torchrun + DDP.

    python scripts/distill.py --checkpoint sd15.safetensors --images data/ --out runs/my_sd15 --stage A
    torchrun --nproc_per_node 8 scripts/distill.py --checkpoint sdxl.safetensors --images data/ --out runs/xl ...
    python scripts/distill.py --unet unet.safetensors --latents latents.safetensors --out runs/x

--images: a folder of images with optional same-name .txt captions (resized and centre-cropped to --resolution,
encoded with the checkpoint's VAE and text encoder). --latents: a safetensors file with `latents` [N,C,H,W]
(video models such as Wan: [N,C,T,H,W]; raw VAE output, as in a ComfyUI LATENT), `cond` [N or 1, T, D], optional
`pooled` [N or 1, P], optional `uncond`/`uncond_pooled` (used for caption drop). Checkpoints (our format,
resumable with --resume) are written by rank 0 as <out>_<stage>_<step>.safetensors. --batch-size is the global
batch, split across processes.
"""
import argparse
import glob
import importlib
import logging
import os
import pathlib
import time

from devkit.comfy_env import import_core, load_pack, setup_comfy

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="full checkpoint (UNet + text encoder + VAE)")
    src.add_argument("--unet", help="diffusion model only (needs --latents)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", help="folder of images (+ .txt captions)")
    data.add_argument("--latents", help="precomputed latents and conditioning (.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint path prefix, e.g. runs/sd15")
    p.add_argument("--stage", choices=("A", "B"), default="A")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--seed", type=int, default=114514)
    p.add_argument("--save-every", type=int, default=2000)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")  # DistillConfig's TRAINING_DTYPES
    p.add_argument("--min-snr-gamma", type=float, default=0.0)
    p.add_argument("--caption-drop", type=float, default=0.15)
    p.add_argument("--gradient-checkpointing", action="store_true")
    import_core()  # the core alone, for the list of students (no ComfyUI needed for --help)
    p.add_argument("--student", choices=importlib.import_module("deltaconv_core.students").STUDENT_TYPES,
                   default="deltaconv",
                   help="fresh students: ΔConv blocks, or mediator attention initialised from the model's attention")
    p.add_argument("--mediator-schedule", default="",
                   help="mediator students' start:count schedule, e.g. 0.0:4,0.5:16,0.8:64 (default that one, or "
                        "the resumed file's)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--resume", help="a checkpoint written by a previous run")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (tests, tiny models)")
    return p.parse_args(argv)


def distributed(cpu: bool):
    """This process's place in data-parallel training; a process group when launched by torchrun."""
    import torch

    from deltaconv_core.distill import Processes  # after load_pack: the pack's own module

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not cpu:
        torch.cuda.set_device(local)
    dist.init_process_group("gloo" if cpu else "nccl")
    return Processes(dist.get_rank(), world, lambda m: DistributedDataParallel(m, device_ids=None if cpu else [local]))


def load_images(folder: str, resolution: int):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    pixels, captions = [], []
    for f in files:
        img = ImageOps.fit(Image.open(f).convert("RGB"), (resolution, resolution), Image.Resampling.LANCZOS)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
        txt = os.path.splitext(f)[0] + ".txt"
        captions.append(pathlib.Path(txt).read_text(encoding="utf-8").strip() if os.path.exists(txt) else "")
    return torch.stack(pixels), captions


def encode_folder(args, clip, vae):
    """Images → raw VAE latents; captions → one CONDITIONING entry per image; "" → the caption-drop entry."""
    import torch

    pixels, captions = load_images(args.images, args.resolution)
    latents = torch.cat([vae.encode(pixels[i:i + 4]) for i in range(0, len(pixels), 4)]).cpu()

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [cond.cpu(), {"pooled_output": pooled.cpu()}]

    return latents, [encode(c) for c in captions], [encode("")]


def read_latents(path):
    from safetensors.torch import load_file

    t = load_file(path)
    if "latents" not in t or "cond" not in t:
        raise SystemExit(f"{path} needs tensors 'latents' [N,C,H,W] (video: [N,C,T,H,W]) and 'cond' [N or 1,T,D]")

    def entries(cond, pooled):
        return [[cond[i:i + 1], {"pooled_output": pooled[i:i + 1]} if pooled is not None else {}]
                for i in range(cond.shape[0])]

    negative = entries(t["uncond"], t.get("uncond_pooled")) if "uncond" in t else None
    return t["latents"], entries(t["cond"], t.get("pooled")), negative


class Rate:
    """Samples per second over the steps this run trained: a resumed run's earlier steps are not counted. Call at()
    after every step."""

    def __init__(self, samples_per_step: int, clock=time.perf_counter):
        self.samples_per_step, self.clock = samples_per_step, clock
        self.started, self.first_step = clock(), None

    def at(self, step: int) -> tuple[int, float, float]:
        """(steps this run trained, seconds since it started, samples per second) after `step`."""
        self.first_step = step if self.first_step is None else self.first_step
        done, seconds = step - self.first_step + 1, self.clock() - self.started
        return done, seconds, done * self.samples_per_step / seconds


def main(argv=None):
    args = parse_args(argv)
    if args.unet and args.images:
        raise SystemExit("--images needs --checkpoint (its VAE and text encoder); with --unet give --latents")
    setup_comfy(None, cpu=args.cpu)  # $COMFYUI_PATH, else the ComfyUI this pack is installed in
    import comfy.sd
    import torch

    pack = load_pack()
    from deltaconv_core.distill import DistillConfig
    from deltaconv_core.weights import load_weights

    processes = distributed(args.cpu)
    rank, world = processes.rank, processes.world
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    log = logging.getLogger("deltaconv")
    if args.checkpoint:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True,
                                                                 output_clip=True)[:3]
    else:
        model, clip, vae = pack.nodes.compat.load_diffusion_model(args.unet), None, None
    if args.images:
        latents, positive, negative = encode_folder(args, clip, vae)
    else:
        latents, positive, negative = read_latents(args.latents)
    config = DistillConfig(stage=args.stage, steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
                           batch_size=args.batch_size, grad_accumulation=args.grad_accumulation, seed=args.seed,
                           caption_drop=args.caption_drop, min_snr_gamma=args.min_snr_gamma,
                           training_dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                           save_every=args.save_every, student=args.student,
                           mediator_schedule=args.mediator_schedule)
    start = load_weights(args.resume) if args.resume else pack.nodes.distill_run.fresh_students(model, config)
    rate = Rate(args.batch_size * args.grad_accumulation)

    def on_step(step, loss):
        done, seconds, samples_per_second = rate.at(step)
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            log.info("step %d/%d  loss %.5g  %.2f samples/s over %d steps in %.1f s", step, args.steps, loss,
                     samples_per_second, done, seconds)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with torch.enable_grad():
        result = pack.nodes.distill_run.train_blocks(
            model, latents, positive, negative, start, config, os.path.dirname(os.path.abspath(args.out)),
            os.path.basename(args.out), on_step=on_step, processes=processes)
    if rank == 0:
        skipped = f" ({result.skipped_steps} steps skipped: non-finite gradients)" if result.skipped_steps else ""
        log.info("saved %s%s", result.checkpoint, skipped)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
