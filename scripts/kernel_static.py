"""What the fused kernels compile to on an NVIDIA GPU, found without one: every launch the block's host code makes
for a given shape is recorded (grid, arguments, constexprs, warps), compiled by Triton's own toolchain for sm_80 /
sm_90 with the specialisation a real call gets (16-divisible integers and 16-aligned pointers, as Triton's launcher
derives them from the arguments), and its registers, spills and shared memory read from the compiled kernel.

    python scripts/kernel_static.py [--arch 90] [--sms 132] [--images 512 1024 2048] [--backward]

SD1.5 / SDXL / PixArt sites at those image sizes, fp16, batch 2; --backward adds the backward launches (training).

Any Python with torch and triton (no GPU, no TRITON_INTERPRET). The recording runs the real host functions on CPU
tensors with stand-ins for the kernels, planned for a GPU with `sms` multiprocessors. A development tool:
tests/test_kernels_compile.py holds the kernels to its figures, and bench/gpu_model.py estimates GPU times from them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from devkit.comfy_env import import_core

import_core()  # deltaconv_core without the repository root (and its nodes/) on sys.path
from deltaconv_core import kernels  # noqa: E402
from deltaconv_core.block import pooled_size  # noqa: E402
from deltaconv_core.kernels import dwconv_gate, output_projection  # noqa: E402

KERNELS = {"_fwd_kernel": dwconv_gate, "_bwd_gate_kernel": dwconv_gate, "_bwd_input_kernel": dwconv_gate,
           "_bwd_weight_kernel": dwconv_gate, "_projection_kernel": output_projection}
# Per SM, sm_80 and sm_90 alike but for shared memory (what one block may use, in bytes).
REGISTERS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32
SHARED_PER_SM = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class Site:
    """One self-attention site at one image size: C channels, a k×k kernel, an h×w token grid, a batch."""
    label: str
    channels: int
    k: int
    grid: tuple[int, int]
    batch: int = 2
    dtype: torch.dtype = torch.float16
    gate: str = "scaled"
    bias: bool = False
    scales: int = 2  # full resolution and ½
    backward: bool = False


@dataclass
class Launch:
    kernel: str
    grid: tuple
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    scalars: dict = field(default_factory=dict)  # the integer arguments (sizes, bands), by name
    site: str = ""
    compiled: dict = field(default_factory=dict)

    def key(self):
        return (self.kernel, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())), tuple(sorted(self.options.items())))


def _specialise(fn, args) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a call with positional `args`, derived as Triton's launcher derives them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(fn.params, args)):
        kind, spec = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":  # an integer 1: Triton bakes it in
            constexprs[param.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **constexprs_and_options)` records a Launch."""

    def __init__(self, name, fn, out):
        self.name, self.fn, self.out = name, fn, out

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **constexprs):
            signature, fixed, attrs = _specialise(self.fn, args)
            signature.update({name: "constexpr" for name in constexprs})
            scalars = {p.name: a for p, a in zip(self.fn.params, args) if isinstance(a, int)}
            self.out.append(Launch(self.name, tuple(grid), signature, {**fixed, **constexprs}, attrs,
                                   dict(num_warps=num_warps, num_stages=num_stages), scalars))
        return launch


@contextlib.contextmanager
def recording(out: list, sms: int, arch: int):
    """The kernels replaced by recorders and the host code planning for a GPU of `sms` SMs and capability `arch`."""
    saved = {name: getattr(module, name) for name, module in KERNELS.items()}
    plan, device_arch = dwconv_gate.plan_launch, output_projection.device_arch
    try:
        for name, module in KERNELS.items():
            setattr(module, name, _Recorder(name, saved[name], out))
        dwconv_gate.plan_launch = lambda h, w, c, n, device: dwconv_gate._planned_launch(h, w, c, n, sms)
        output_projection.device_arch = lambda t: divmod(arch, 10)
        yield
    finally:
        for name, module in KERNELS.items():
            setattr(module, name, saved[name])
        dwconv_gate.plan_launch, output_projection.device_arch = plan, device_arch


def _block_tensors(site: Site) -> dict:
    """Zero tensors of one block's kernel path at `site`: u (conv_up's output), the gates, the projection's."""
    b, (h, w), ci = site.batch, site.grid, site.channels // 2
    weight = torch.zeros(site.k, site.k, ci, dtype=site.dtype)
    bias = torch.zeros(ci, dtype=site.dtype) if site.bias else None
    return {"u": torch.zeros(b, h, w, ci, dtype=site.dtype),
            "gates": [(weight, bias, None if s == 0 else pooled_size((h, w), 0.5 ** s)) for s in range(site.scales)],
            "gate": site.gate, "gate_constant": 8.0,
            "weight": torch.zeros(site.channels, site.scales * ci // 2, dtype=site.dtype),
            "image_bias": torch.zeros(b, site.channels, dtype=site.dtype),
            "bias": torch.zeros(site.channels, dtype=site.dtype)}


def record_site(site: Site, sms: int, arch: int) -> list[Launch]:
    """Every kernel launch of one block's kernel path (after conv_up) at `site`: the forward as sampling runs it
    (kernels.delta_conv_triton without gradients), and with site.backward the backward launches of each scale."""
    block = _block_tensors(site)
    out: list[Launch] = []
    with recording(out, sms, arch), torch.no_grad():
        kernels.delta_conv_triton(**block)
        if site.backward:
            u = block["u"]
            for weight, bias, pool_to in block["gates"]:
                v = u if pool_to is None else torch.zeros(u.shape[0], *pool_to, u.shape[3], dtype=u.dtype)
                gy = torch.zeros(*v.shape[:3], v.shape[3] // 2, dtype=v.dtype)
                dwconv_gate._backward(v, weight, bias, gy, site.gate == "sigmoid", 8.0, True, True, site.bias)
    for launch in out:
        launch.site = site.label
    return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_microseconds(site: Site, sms: int, arch: int, repeats: int = 1000, warmup: int = 100) -> float:
    """Python time of the kernel path's host code for one block forward at `site` in sampling
    (kernels.delta_conv_triton: checks, planning, allocations, pooling where torch does it), with the launches
    themselves stubbed out; median of `repeats` after `warmup` calls (first-call imports, caches, the allocator)."""
    block = _block_tensors(site)
    times = []
    with recording([], sms, arch), torch.no_grad():
        for name, module in KERNELS.items():
            setattr(module, name, _NoLaunch())
        for _ in range(warmup):
            kernels.delta_conv_triton(**block)
        for _ in range(repeats):
            start = time.perf_counter()
            kernels.delta_conv_triton(**block)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")
SPILL = re.compile(r"\b(STL|LDL)\b")  # local-memory stores and loads: register spills


def sass_instructions(sass: str) -> list[str]:
    """The kernel's SASS instructions, NOPs (padding) left out."""
    return [m[2] for m in map(SASS_LINE.match, sass.splitlines()) if m and not m[2].startswith("NOP")]


def inner_loop(sass: str) -> dict:
    """The innermost loop with FFMAs (the body of a backward branch): its SASS instructions, FFMAs and their ratio."""
    code = [(int(m[1], 16), m[2]) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    index = {offset: i for i, (offset, _) in enumerate(code)}
    best = {}
    for end, (_, text) in enumerate(code):
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        start = index.get(int(target[1], 16)) if target else None
        if start is None or start > end:
            continue
        body = [t for _, t in code[start:end + 1] if not t.startswith("NOP")]
        ffma = sum(bool(re.search(r"\b(FFMA|HFMA2)\b", t)) for t in body)
        if ffma and (not best or len(body) < best["instructions"]):
            best = {"instructions": len(body), "ffma": ffma, "per_fma": len(body) / ffma,
                    "loop_spills": sum(bool(SPILL.search(t)) for t in body)}
    return best


def _compile(job):
    launch, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(KERNELS[launch.kernel], launch.kernel)
    try:
        kernel = triton.compile(ASTSource(fn, launch.signature, constexprs=launch.constexprs, attrs=launch.attrs),
                                target=GPUTarget("cuda", arch, 32), options=launch.options)
    except Exception as e:  # every failing configuration is reported, not just the first
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    usage = dict(re.findall(r"(\w+):(\d+)", _cuobjdump(kernel.asm["cubin"], "--dump-resource-usage")
                            .split("Function", 1)[1]))
    registers, sass = int(usage["REG"]), _cuobjdump(kernel.asm["cubin"], "-sass")
    threads = 32 * launch.options["num_warps"]
    shared = kernel.metadata.shared
    blocks = min(REGISTERS_PER_SM // max(registers * threads, 1), MAX_THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM,
                 SHARED_PER_SM[arch] // shared if shared else MAX_BLOCKS_PER_SM)
    return {"registers": registers, "spills": len(SPILL.findall(sass)), "shared": shared, "blocks_per_sm": blocks,
            "occupancy": blocks * threads / MAX_THREADS_PER_SM, "total_instructions": len(sass_instructions(sass)),
            **inner_loop(sass)}


def compile_all(launches: list[Launch], arch: int, workers: int = 2) -> list[Launch]:
    """Compiles each distinct launch once (two at a time); fills `compiled` of every launch."""
    unique = {launch.key(): launch for launch in launches}
    with ProcessPoolExecutor(workers) as pool:
        results = dict(zip(unique, pool.map(_compile, [(launch, arch) for launch in unique.values()])))
    for launch in launches:
        launch.compiled = results[launch.key()]
    return launches


def sites(images=(512, 1024, 2048)) -> list[Site]:
    """SD1.5's and SDXL's sites (channels, the authors' kernel sizes) at batch 2 (CFG), fp16, and PixArt-Σ's."""
    out = []
    for image in images:
        g = image // 8
        out += [Site(f"sd15 L0 k7 @{image}", 320, 7, (g, g)), Site(f"sd15 L0 k11 @{image}", 320, 11, (g, g)),
                Site(f"sd15 L1 k9 @{image}", 640, 9, (g // 2, g // 2)),
                Site(f"sd15 L2 k5 @{image}", 1280, 5, (g // 4, g // 4)),
                Site(f"sdxl L1 k13 @{image}", 640, 13, (g // 2, g // 2)),
                Site(f"sdxl L2 k9 @{image}", 1280, 9, (g // 4, g // 4)),
                Site(f"pixart k13 @{image}", 1152, 13, (g // 2, g // 2), gate="sigmoid", bias=True)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU planned for (H100/H200: 132)")
    p.add_argument("--images", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--backward", action="store_true", help="the backward launches too (training), no host time")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    chosen = [dataclasses.replace(site, backward=args.backward) for site in sites(tuple(args.images))]
    launches = [launch for site in chosen for launch in record_site(site, args.sms, args.arch)]
    compile_all(launches, args.arch)
    print("| site | kernel | grid | programs/SM | constexprs | regs | spill instructions | smem | occupancy | "
          "SASS/FMA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for launch in launches:
        c, n = launch.compiled, functools.reduce(lambda a, b: a * b, launch.grid)
        shown = {k: v for k, v in launch.constexprs.items() if k.isupper()}
        print(f"| {launch.site} | {launch.kernel} | {launch.grid} | {n / args.sms:.1f} | {shown} | "
              + (f"{c['registers']} | {c['spills']} | {c['shared']} | {c['occupancy']:.0%} | "
                 f"{c.get('per_fma', float('nan')):.2f} |" if "error" not in c else f"error: {c['error']} | | | | |"))
    if not args.backward:
        site = chosen[0]
        print(f"\nhost time of the kernel path per block ({site.label}, launches stubbed, this CPU): "
              f"{host_microseconds(site, args.sms, args.arch):.0f} µs")
    return 1 if any("error" in launch.compiled for launch in launches) else 0


if __name__ == "__main__":
    sys.exit(main())
