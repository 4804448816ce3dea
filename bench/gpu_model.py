"""GPU performance model: ΔConv blocks and UNet steps on H100/H200, estimated on the CPU (no GPU).

    python bench/gpu_model.py [--device h200] [--images 512 1024 2048 4096] [--out bench/results]
    python bench/gpu_model.py --backward [--device h200] [--images 512 1024]   # training: the backward per block

ESTIMATES from stated constants, for bench/gpu_check.py's measurements to replace:
- the block's fused kernels: the launches its host code makes, compiled for sm_90 (scripts/kernel_static.py); a
  launch takes max(issue time, DRAM time, launch floor), issue time being the busiest SM's warp-instructions (inner
  loop SASS × trip count, plus the kernel's straight-line SASS once) at the issue rate, times an efficiency that
  grows with the warps per scheduler;
- the block's torch launches (conv_up, mean, conv_pool; pooling only where the full-resolution launch cannot write
  the ½ scale's input, odd grids): FLOPs at the GEMM rate or bytes at the DRAM rate, each at least the launch floor;
- attention (attn1): SDPA FLOPs (4·N²·C per image) at an SDPA rate range (head dim 40 runs at about half rate), the
  q/k/v/out projections (8·N·C²) at the GEMM rate;
- the rest of the step: FLOPs, memory-bound bytes and ops of ComfyUI's own UNet without attn1 on the meta device
  (op_count.record: an SDPA call is one op), at the GEMM and DRAM rates; a step takes at least its host time (ops ×
  one eager op), ΔConv adds its host path;
- a forward on PyTorch ops (bench_wan.py's Wan blocks: the 3-D ΔConv block, mediator attention, Wan's attention),
  recorded op by op on fake CUDA tensors (op_count.py): each op its MACs at the GEMM, SDPA or CUDA-core rate or its
  bytes at the DRAM rate, at least the launch floor (torch_path_us).
The ceiling: the same step with attn1 removed entirely.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import devkit_path  # noqa: F401  (scripts/ importable: kernel_static and devkit, whatever Python runs this)
import harness
import kernel_static as ks
import torch

from devkit.device_info import device_name


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
    cuda_core_tflops: float = 30.0  # what depthwise convolutions and fp32 SDPA reach without tensor cores (a guess)
    issue_efficiency: tuple[float, float, float] = (0.6, 0.8, 0.9)  # warps per scheduler ≤ 1, ≤ 2, more


DEVICES = {
    "h200": Device("NVIDIA H200 (model)", 132, 1.8, 3.5, 450.0, 300.0, (275.0, 550.0), 2.0, 6.0),
    "h100": Device("NVIDIA H100 SXM (model)", 132, 1.8, 2.8, 450.0, 300.0, (275.0, 550.0), 2.0, 6.0),
}
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


def straight_line(compiled: dict) -> int:
    """SASS instructions of a kernel outside its inner loop (index maths, gate, stores, the pooled side output),
    counted in the compiled kernel: each runs once per warp."""
    return compiled["total_instructions"] - compiled["instructions"]


def dwconv_us(launch: ks.Launch, site: ks.Site, d: Device) -> float:
    c, k = launch.compiled, launch.constexprs["K"]
    per_warp = k * k * c["instructions"] + straight_line(c)  # one k×k loop nest computes both gate halves
    programs = math.prod(launch.grid)
    issue = issue_us(programs, launch.options["num_warps"], per_warp, c["blocks_per_sm"], d)
    pixels = math.prod(launch.grid[::2]) * launch.constexprs["TILE_H"] * launch.constexprs["TILE_W"]  # tiles × tile
    # read C_i, write C_i/2, and with POOL the pooled C_i of a quarter of the pixels
    moved = pixels * (site.channels // 2) * (1.5 + 0.25 * launch.constexprs["POOL"]) * BYTES[site.dtype]
    return max(issue, moved / (d.bandwidth_tbs * 1e6), d.launch_floor_us)


def block_us(site: ks.Site, d: Device, launches: list[ks.Launch], host_kernel_us: float) -> tuple[float, float]:
    """(GPU, host) time of one block forward at `site`."""
    b, (h, w), c = site.batch, site.grid, site.channels
    n, ci, es = b * h * w, c // 2, BYTES[site.dtype]
    bw = d.bandwidth_tbs * 1e6  # bytes per µs
    torch_ops = {  # the block's own torch launches on the CUDA path (block.py, forward)
        "conv_up": max(2 * n * c * ci / (d.gemm_tflops * 1e6), n * (c + ci) * es / bw),
        "mean": n * c * es / bw, "conv_pool": 0.0}
    if site.scales > 1 and not launches[0].constexprs["POOL"]:  # odd grids: torch pools the ½ scale's input
        torch_ops["pooling"] = n * ci * 1.25 * es / bw
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


def op_us(op, d: Device, sdpa_tflops: float) -> float:
    """One recorded op (op_count.Op) as one launch: its MACs at its kind's rate (GEMMs at the GEMM rate, an fp16
    SDPA at `sdpa_tflops`, convolutions and fp32 SDPA on CUDA cores) or its bytes at the DRAM rate, whichever is
    longer, and at least the launch floor."""
    rate = {"gemm": d.gemm_tflops, "attention": sdpa_tflops if op.half else d.cuda_core_tflops,
            "conv": d.cuda_core_tflops}.get(op.kind)
    compute = 2 * op.macs / (rate * 1e6) if rate else 0.0
    return max(compute, op.bytes / (d.bandwidth_tbs * 1e6), d.launch_floor_us)


def torch_path_us(ops: list, d: Device) -> tuple[tuple[float, float], float]:
    """((GPU µs at the fast, at the slow SDPA rate), host µs) of a forward on PyTorch ops, recorded as `ops`
    (op_count.record on fake CUDA tensors): each op one launch (op_us), each one eager op of host time."""
    gpu = tuple(sum(op_us(op, d, rate) for op in ops) for rate in (d.sdpa_tflops[1], d.sdpa_tflops[0]))
    return gpu, len(ops) * d.host_us_per_op


BACKWARD = ("_bwd_gate_kernel", "_bwd_input_kernel", "_bwd_weight_kernel")


def backward_us(site: ks.Site, d: Device, launches: list[ks.Launch]) -> dict:
    """GPU time of one block's dwconv + gate backward at `site` (recorded with backward=True): each backward kernel
    summed over the scales, and "sums", the torch ops after them (the weight gradient's partials summed, Σ dvc for
    the bias, casts). The projection's, the pooling's and conv_up's backward (torch) are not in it."""
    es, bw, floor = BYTES[site.dtype], d.bandwidth_tbs * 1e6, d.launch_floor_us
    out = dict.fromkeys((*BACKWARD, "sums"), 0.0)
    for launch in (launch for launch in launches if launch.kernel in BACKWARD):
        c, s, k = launch.compiled, launch.scalars, launch.constexprs["K"]
        if launch.kernel == "_bwd_weight_kernel":  # a pixel per inner-loop trip; dvc once, v with a halo per band
            n, band = s["rows"] * s["W"] * s["C"], s["band"]
            per_warp = band * s["W"] * c["instructions"] + straight_line(c)
            partials = launch.grid[0] * k * k * s["C"] * 4
            moved = n * (4 + es * min(band + k - 1, s["rows"]) / band) + partials
            cast = floor if es < 4 else 0.0  # .to(weight.dtype)
            out["sums"] += max(partials / bw, floor) + cast  # part.sum(0)
            if site.bias:
                out["sums"] += max(n * 4 / bw, floor) + cast  # dvc.sum for the bias
        else:  # k² inner-loop trips, as the forward
            per_warp = k * k * c["instructions"] + straight_line(c)
            pixels = math.prod(launch.grid[::2]) * launch.constexprs["TILE_H"] * launch.constexprs["TILE_W"]
            per_pixel = (s["C"] * es + s["HALF"] * es + s["C"] * 4 if launch.kernel == "_bwd_gate_kernel"
                         else s["C"] * 4 + s["C"] * es)  # gate: v, gy in, dvc out; input: dvc in, dv out
            moved = pixels * per_pixel
        issue = issue_us(math.prod(launch.grid), launch.options["num_warps"], per_warp, c["blocks_per_sm"], d)
        out[launch.kernel] += max(issue, moved / bw, floor)
    return out


def backward_table(images: list[int], d: Device) -> str:
    """The dwconv + gate backward of one block per SD1.5/SDXL/PixArt site (fp16, batch 2), in µs."""
    sites = [replace(site, backward=True) for site in ks.sites(tuple(images))]
    launches = {site: [launch for launch in ks.record_site(site, d.sms, 90) if launch.kernel in BACKWARD]
                for site in sites}
    ks.compile_all([launch for site in sites for launch in launches[site]], 90)
    rows = []
    for site in sites:
        t = backward_us(site, d, launches[site])
        rows.append([site.label, *(f"{t[key]:.1f}" for key in (*BACKWARD, "sums")), f"{sum(t.values()):.1f}"])
    return harness.table(["site", "gate", "input", "weight", "torch sums", "total µs"], rows)


# ---------------------------------------------------------------------------------------- the rest of a UNet step
@functools.cache
def unet_rest(family: str, image: int, batch: int = 2) -> dict:
    """FLOPs, the bytes of its memory-bound ops and its op count (op_count.record: SDPA, of attn2, one op as the GPU
    runs it) for one step of ComfyUI's full-size UNet with attn1 removed, and its sites."""
    import op_count
    from bench_unet import unet_config

    from devkit.comfy_env import setup_comfy

    setup_comfy(None, cpu=True)
    import comfy.ldm.modules.attention as attention

    from deltaconv_core.families import find_attention_sites

    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    cls, config, ctx = unet_config(family)
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
    ops = op_count.record(lambda: model(x, torch.zeros(batch, device="meta"), **kwargs))
    return {"flops": 2 * sum(op.macs for op in ops), "bytes": sum(op.bytes for op in ops if op.kind == "memory"),
            "ops": len(ops), "sites": [(s.channels, s.kernel_size, latent >> s.level) for s in sites.sites]}


class _Skip(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def step(family: str, image: int, d: Device, host_by_site: dict) -> dict:
    """One step's time with attention, with ΔConv at every site, with `auto` (per site the faster of the two as its
    synchronised timing sees it, then the fastest of those choices, every student and every attention as the whole
    call's timing sees it), and with attn1 removed (the ceiling). Two values each where attention's rate is a range
    (fast, slow)."""
    rest = unet_rest(family, image)
    base_gpu = rest["flops"] / (d.gemm_tflops * 1e6) + rest["bytes"] / (d.bandwidth_tbs * 1e6)
    base_host = rest["ops"] * d.host_us_per_op
    attention_host = 6 * d.host_us_per_op  # q, k, v, SDPA, out, bias
    totals = {key: [[0.0, 0.0], [0.0, 0.0]] for key in ("attention", "deltaconv", "auto")}  # [gpu, host] × range
    sites = [ks.Site(f"{family} C{c} k{k}", c, k, (g, g)) for c, k, g in rest["sites"]]
    launches = {site: ks.record_site(site, d.sms, 90) for site in dict.fromkeys(sites)}  # compiled in one pass:
    ks.compile_all([launch for recorded in launches.values() for launch in recorded], 90)
    for site in sites:
        block = block_us(site, d, launches[site], host_by_site[site.channels])
        for i, attention in enumerate(attention_us(site.channels, math.prod(site.grid), 2, d)):
            choices = {"attention": (attention, attention_host), "deltaconv": block}
            choices["auto"] = min(choices.values(), key=max)  # a synchronised call takes ≈ max(host, GPU)
            for key, (gpu, host) in choices.items():
                totals[key][i][0] += gpu
                totals[key][i][1] += host
    times = {key: [max(base_gpu + gpu, base_host + host) for gpu, host in pair] for key, pair in totals.items()}
    # ... then the first model call is timed whole with those choices, every student, every attention: the fastest
    times["auto"] = [min(plans) for plans in zip(*times.values())]
    ceiling = max(base_gpu, base_host)
    return {"family": family, "image": image, "sites": len(rest["sites"]), "rest_ms": ceiling / 1e3,
            **{f"{key}_ms": [t / 1e3 for t in values] for key, values in times.items()},
            "attn1_share": [gpu / (base_gpu + gpu) for gpu, _ in totals["attention"]],
            "speedup": [a / t for a, t in zip(times["attention"], times["deltaconv"])],
            "auto_speedup": [a / t for a, t in zip(times["attention"], times["auto"])],
            "ceiling": [a / ceiling for a in times["attention"]]}


def markdown(result: dict) -> str:
    meta, d = result["meta"], result["device"]
    span = lambda v, fmt: (fmt.format(v[0]) if abs(v[0] - v[1]) < 1e-9 else
                           f"{fmt.format(min(v))}–{fmt.format(max(v))}")
    rows = [[s["family"], f"{s['image']}²", str(s["sites"]), f"{s['rest_ms']:.1f}", span(s["attention_ms"], "{:.1f}"),
             span(s["deltaconv_ms"], "{:.1f}"), span(s["attn1_share"], "{:.0%}"), span(s["speedup"], "{:.2f}×"),
             span(s["auto_speedup"], "{:.2f}×"), span(s["ceiling"], "{:.2f}×")] for s in result["steps"]]
    loads = " → ".join("?" if v is None else f"{v:.1f}" for v in meta["load_average"] or (None, None))
    return "\n".join([harness.header(
        f"{d['name']}: an estimate, not a measurement", meta,
        f"constants: {d['sms']} SMs at {d['clock_ghz']} GHz, {d['bandwidth_tbs']} TB/s, GEMM {d['gemm_tflops']:g} "
        f"TFLOP/s (fused projection {d['fused_gemm_tflops']:g}), SDPA {d['sdpa_tflops'][0]:g}–{d['sdpa_tflops'][1]:g} "
        f"TFLOP/s, launch floor {d['launch_floor_us']} µs, host {d['host_us_per_op']} µs per eager op; issue "
        f"efficiency {d['issue_efficiency']} at ≤ 1, ≤ 2, > 2 warps per scheduler",
        f"host time of the kernel path per block, launches stubbed (this CPU at load average {loads}): "
        + ", ".join(f"C={c}: {us:.0f} µs" for c, us in result["host_kernel_path_us"].items())),
        harness.table(["model", "image", "sites", "step without attn1 ms", "attention step ms", "ΔConv step ms",
                       "attn1 share", "ΔConv speed-up", "with `auto`", "ceiling"], rows)]) + "\n"


def main() -> int:
    p = harness.parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=sorted(DEVICES), default="h200")
    p.add_argument("--images", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--backward", action="store_true",
                   help="print the dwconv + gate backward of one block per site instead (writes no results)")
    args = harness.parse(p)
    os.environ.pop("TRITON_INTERPRET", None)
    d, run = DEVICES[args.device], harness.Run(__file__)
    if args.backward:
        print(f"{d.name}: dwconv + gate backward of one block, both scales, µs\n\n{backward_table(args.images, d)}")
        return 0
    host_by_site = {c: ks.host_microseconds(ks.Site("host", c, 7, (64, 64)), d.sms, 90) for c in (320, 640, 1280)}
    steps = [step(f, image, d, host_by_site) for f in ("sd15", "sdxl") for image in args.images
             if f == "sd15" or 1024 <= image <= 2048]  # SDXL is made for 1024²
    result = {"meta": run.meta(device_name("cpu"), estimate=True), "device": asdict(d),
              "host_kernel_path_us": host_by_site, "steps": steps}
    harness.write(args.out, f"gpu_model_{args.device}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
