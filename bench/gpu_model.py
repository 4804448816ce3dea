"""GPU performance model: ΔConv blocks and UNet steps on H100/H200, estimated on the CPU (no GPU).

    python bench/gpu_model.py [--device h200] [--images 512 1024 2048 4096] [--out bench/results]

Everything here is an ESTIMATE from stated constants, to be replaced by what bench/gpu_check.py measures:
- the block's fused kernels: the launches its host code really makes (bench/kernel_static.py), compiled for sm_90
  with the launcher's specialisation; a launch takes max(issue time, DRAM time, the launch floor), where issue time
  is the busiest SM's warp-instructions (the inner loop's SASS × its trip count) at the scheduler issue rate, scaled
  by an efficiency that grows with the warps each scheduler has to choose from;
- the block's torch launches (conv_up, mean, conv_pool, bias, pooling): FLOPs at the GEMM rate or bytes at the DRAM
  rate, each at least the launch floor;
- attention (attn1): SDPA FLOPs (4·N²·C per image) at an SDPA rate (a range: head dims of 40 run at about half
  rate), the q/k/v/out projections (8·N·C²) at the GEMM rate;
- the rest of the step: FLOPs, non-GEMM bytes and op count of ComfyUI's own UNet on the meta device with attn1
  removed (torch's FlopCounterMode and a dispatch mode), at the GEMM and DRAM rates; a step takes at least its
  host time (ops × the host cost of one eager op), and ΔConv adds its measured host path.
The ceiling of a step speed-up is the same step with attn1 removed entirely; both are reported.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
import kernel_static as ks
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Device:
    """Every constant of the model, in one place. Sources: vendor specs; achievable rates are estimates that the
    GPU check's measurements replace (its copy bandwidth, its SDPA and GEMM times)."""
    name: str
    sms: int
    clock_ghz: float  # sustained SM clock under load
    bandwidth_tbs: float  # achievable DRAM bandwidth (a device-to-device copy)
    gemm_tflops: float  # fp16 dense GEMM, cuBLAS, large shapes
    fused_gemm_tflops: float  # our fused projection (tl.dot with bilinear taps in the K loop): about ⅔ of cuBLAS
    sdpa_tflops: tuple[float, float]  # flash attention, head dim 40 (padded to 64) … 64+
    launch_floor_us: float  # the shortest a kernel takes on the device, launch to completion
    host_us_per_op: float  # the CPU time of one eager torch op or Triton launch on a desktop CPU
    schedulers_per_sm: int = 4
    issue_efficiency: tuple[float, float, float] = (0.6, 0.8, 0.9)  # warps per scheduler ≤ 1, ≤ 2, more


DEVICES = {
    "h200": Device("NVIDIA H200 (model)", 132, 1.8, 3.5, 450.0, 300.0, (275.0, 550.0), 2.0, 6.0),
    "h100": Device("NVIDIA H100 SXM (model)", 132, 1.8, 2.8, 450.0, 300.0, (275.0, 550.0), 2.0, 6.0),
}
KERNEL_PROLOGUE = 150  # SASS instructions per warp outside the tap loops (index maths, gate, store), counted
BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


# ------------------------------------------------------------------------------------------------ one ΔConv block
def issue_us(programs: int, warps: int, instructions_per_warp: float, blocks_per_sm: int, d: Device) -> float:
    """The busiest SM's time to issue its programs' instructions."""
    per_sm = math.ceil(programs / d.sms)
    resident = min(per_sm, blocks_per_sm) * warps  # warps an SM interleaves
    per_scheduler = resident / d.schedulers_per_sm
    efficiency = d.issue_efficiency[0 if per_scheduler <= 1 else 1 if per_scheduler <= 2 else 2]
    rate = min(resident, d.schedulers_per_sm) * efficiency * d.clock_ghz * 1e3  # warp-instructions per µs
    return per_sm * warps * instructions_per_warp / rate


def dwconv_us(launch: ks.Launch, site: ks.Site, d: Device) -> float:
    c, k = launch.compiled, launch.constexprs["K"]
    per_warp = k * k * c["instructions"] + KERNEL_PROLOGUE  # one k×k loop nest computes both gate halves
    programs = math.prod(launch.grid)
    issue = issue_us(programs, launch.options["num_warps"], per_warp, c["blocks_per_sm"], d)
    pixels = launch.grid[2] * launch_pixels(launch)
    dram = pixels * (site.channels // 2) * 1.5 * BYTES[site.dtype] / (d.bandwidth_tbs * 1e6)  # read C_i, write C_i/2
    return max(issue, dram, d.launch_floor_us)


def launch_pixels(launch: ks.Launch) -> int:
    """Pixels of one image a dwconv launch covers (tiles × tile size, an upper bound at the edges)."""
    return launch.grid[0] * launch.constexprs["TILE_H"] * launch.constexprs["TILE_W"]


def block_us(site: ks.Site, d: Device, launches: list[ks.Launch], host_kernel_us: float) -> tuple[float, float]:
    """(GPU, host) time of one block forward at `site`."""
    b, (h, w), c = site.batch, site.grid, site.channels
    n, ci, es = b * h * w, c // 2, BYTES[site.dtype]
    bw = d.bandwidth_tbs * 1e6  # bytes per µs
    torch_ops = {  # the block's own torch launches on the CUDA path (block.py, forward)
        "conv_up": max(2 * n * c * ci / (d.gemm_tflops * 1e6), n * (c + ci) * es / bw),
        "mean": n * c * es / bw, "conv_pool": 0.0, "bias": 0.0,
        "pooling": n * ci * 1.25 * es / bw,
    }
    gpu = {name: max(t, d.launch_floor_us) for name, t in torch_ops.items()}
    for i, launch in enumerate(launches):
        if launch.kernel == "_fwd_kernel":
            gpu[f"dwconv {i}"] = dwconv_us(launch, site, d)
        else:
            flops = 2 * n * c * site.scales * ci // 2
            moved = (n * ci // 2 * (1 + 0.25 * (site.scales - 1)) + n * c) * es
            gpu["projection"] = max(flops / (d.fused_gemm_tflops * 1e6), moved / bw, d.launch_floor_us)
    host = host_kernel_us + len(torch_ops) * d.host_us_per_op + len(launches) * d.host_us_per_op
    return sum(gpu.values()), host


def attention_us(c: int, tokens: int, batch: int, d: Device) -> tuple[float, float]:
    """attn1 at the SDPA rate range (fast, slow): SDPA plus the four projections."""
    projections = 8 * batch * tokens * c * c / (d.gemm_tflops * 1e6)
    sdpa = 4 * batch * tokens * tokens * c
    return tuple(projections + max(sdpa / (rate * 1e6), d.launch_floor_us)
                 for rate in (d.sdpa_tflops[1], d.sdpa_tflops[0]))


# ---------------------------------------------------------------------------------------- the rest of a UNet step
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product", "linear")


class CountOps(TorchDispatchMode):
    """Ops and the bytes non-GEMM ops read and write (meta tensors: nothing runs)."""

    def __init__(self):
        super().__init__()
        self.ops = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if name not in ("view", "_unsafe_view", "t", "permute", "expand", "detach", "unsqueeze", "reshape",
                        "transpose", "slice", "select", "split", "chunk", "squeeze", "alias"):
            self.ops += 1
            if not any(g in name for g in GEMM_OPS):
                tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if torch.is_tensor(t)]
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


@functools.cache
def unet_rest(family: str, image: int, batch: int = 2) -> dict:
    """FLOPs, non-GEMM bytes and ops of one step of ComfyUI's full-size UNet with attn1 removed, and its sites."""
    from bench_unet import SD15_FULL, SDXL_FULL
    from torch.utils.flop_counter import FlopCounterMode

    from devkit.comfy_env import setup_comfy
    from devkit.tiny_models import KOALA_TINY, SD15_TINY

    setup_comfy(None, cpu=True)
    import comfy.ldm.modules.attention as attention
    import comfy.supported_models

    from deltaconv_core.families import find_attention_sites

    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    config, cls, ctx = (({**KOALA_TINY, **SDXL_FULL}, comfy.supported_models.SDXL, 2048) if family == "sdxl"
                        else ({**SD15_TINY, **SD15_FULL}, comfy.supported_models.SD15, 768))
    with torch.device("meta"):
        model = cls({**config, "dtype": torch.float16}).get_model({}, device=torch.device("meta")).diffusion_model
    sites = find_attention_sites(model)
    for site in sites.sites:  # attn1 removed: x + attn1(norm1(x)) becomes x + norm1(x)
        parent, name = site.path.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, _Skip())
    latent = image // 8
    x = torch.zeros(batch, 4, latent, latent, device="meta", dtype=torch.float16)
    kwargs = {"context": torch.zeros(batch, 77, ctx, device="meta", dtype=torch.float16)}
    if family == "sdxl":
        kwargs["y"] = torch.zeros(batch, 2816, device="meta", dtype=torch.float16)
    with FlopCounterMode(display=False) as flops, CountOps() as ops, torch.no_grad():
        model(x, torch.zeros(batch, device="meta"), **kwargs)
    return {"flops": flops.get_total_flops(), "bytes": ops.bytes, "ops": ops.ops,
            "sites": [(s.channels, s.kernel_size, latent >> s.level) for s in sites.sites]}


class _Skip(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def step(family: str, image: int, d: Device, host_by_site: dict) -> dict:
    """One step's time with attention, with ΔConv at every site, with ΔConv where `auto` would keep it (the faster of
    the two per site as its synchronised timing sees it), and with attn1
    removed (the ceiling). Two values each where attention's rate is a range (fast, slow)."""
    rest = unet_rest(family, image)
    base_gpu = rest["flops"] / (d.gemm_tflops * 1e6) + rest["bytes"] / (d.bandwidth_tbs * 1e6)
    base_host = rest["ops"] * d.host_us_per_op
    attention_host = 6 * d.host_us_per_op  # q, k, v, SDPA, out, bias
    totals = {key: [[0.0, 0.0], [0.0, 0.0]] for key in ("attention", "deltaconv", "auto")}  # [gpu, host] × range
    sites = [ks.Site(f"{family} C{c} k{k}", c, k, (g, g)) for c, k, g in rest["sites"]]
    launches = compiled_launches(sites, d)
    for site in sites:
        block = block_us(site, d, launches[site], host_by_site[site.channels])
        for i, attention in enumerate(attention_us(site.channels, math.prod(site.grid), 2, d)):
            choices = {"attention": (attention, attention_host), "deltaconv": block}
            choices["auto"] = min(choices.values(), key=max)  # a synchronised call takes ≈ max(host, GPU)
            for key, (gpu, host) in choices.items():
                totals[key][i][0] += gpu
                totals[key][i][1] += host
    times = {key: [max(base_gpu + gpu, base_host + host) for gpu, host in pair] for key, pair in totals.items()}
    ceiling = max(base_gpu, base_host)
    return {"family": family, "image": image, "sites": len(rest["sites"]), "rest_ms": ceiling / 1e3,
            **{f"{key}_ms": [t / 1e3 for t in values] for key, values in times.items()},
            "attn1_share": [gpu / (base_gpu + gpu) for gpu, _ in totals["attention"]],
            "speedup": [a / t for a, t in zip(times["attention"], times["deltaconv"])],
            "auto_speedup": [a / t for a, t in zip(times["attention"], times["auto"])],
            "ceiling": [a / ceiling for a in times["attention"]]}


def compiled_launches(sites: list[ks.Site], d: Device) -> dict:
    """Site → its block's launches, recorded and compiled for sm_90 (all sites' launches in one compile pass)."""
    recorded = {site: ks.record_site(site, d.sms, 90) for site in dict.fromkeys(sites)}
    ks.compile_all([launch for launches in recorded.values() for launch in launches], 90)
    return recorded


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=sorted(DEVICES), default="h200")
    p.add_argument("--images", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    d = DEVICES[args.device]
    load_before = os.getloadavg()[0]
    host_by_site = {c: ks.host_microseconds(ks.Site("host", c, 7, (64, 64)), d.sms, 90) for c in (320, 640, 1280)}
    steps = [step(f, image, d, host_by_site) for f in ("sd15", "sdxl") for image in args.images
             if f == "sd15" or 1024 <= image <= 2048]  # SDXL is made for 1024²
    result = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "command": " ".join(["python", "bench/gpu_model.py", *sys.argv[1:]]), "estimate": True,
                       "load average before / after (host times)": [load_before, os.getloadavg()[0]],
                       "cpu cores": os.cpu_count()},
              "device": asdict(d), "host_kernel_path_us": host_by_site, "steps": steps}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gpu_model_{args.device}.json"), "w") as f:
        json.dump(result, f, indent=1)
    for s in steps:
        print(f"{s['family']} {s['image']}²: ΔConv {s['speedup'][0]:.2f}–{s['speedup'][1]:.2f}×, auto "
              f"{s['auto_speedup'][0]:.2f}–{s['auto_speedup'][1]:.2f}×, ceiling {s['ceiling'][0]:.2f}–"
              f"{s['ceiling'][1]:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
