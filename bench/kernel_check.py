"""Kernel correctness for the GPU check: the ΔConvBlock routed through the fused Triton kernels, forward and backward,
against float64.

The forward is compared with deltaconv_core/reference.py (explicit pooling windows and bilinear taps, float64). The
gradients of the input and of every parameter are compared with the block's PyTorch path run in float64 (no kernel
takes float64), whose forward is first checked against the same reference: autograd through the reference's
per-window loops would take hours at a 512² grid. Errors are relative to the largest |reference| value.
"""
from __future__ import annotations

from dataclasses import dataclass

import devkit_path  # noqa: F401  (scripts/devkit importable, whatever Python runs this)
import torch

from devkit.comfy_env import import_core

import_core()
from deltaconv_core import kernels  # noqa: E402
from deltaconv_core.block import BlockConfig  # noqa: E402
from deltaconv_core.reference import reference_block_forward  # noqa: E402
from deltaconv_core.students import build_student  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class KernelCase:
    dtype: torch.dtype
    grid: tuple[int, int]
    dim: int
    kernel_size: int
    pooled: bool  # scales (1, ½): the pooling inside the dwconv+gate kernel and the upsampling projection
    gate: str
    dw_bias: bool
    batch: int = 2

    @property
    def config(self) -> BlockConfig:
        return BlockConfig(dim=self.dim, kernel_size=self.kernel_size, scales=(1.0, 0.5) if self.pooled else (1.0,),
                           gate=self.gate, dw_bias=self.dw_bias)

    @property
    def label(self) -> str:
        return (f"{str(self.dtype).replace('torch.', '')} {self.batch}×{self.grid[0]}×{self.grid[1]}×{self.dim} "
                f"k{self.kernel_size} {'pooled' if self.pooled else 'full-res'} {self.gate}"
                f"{' +bias' if self.dw_bias else ''}")


def cases(smoke: bool) -> list[KernelCase]:
    """SD1.5's first level at a 4096² image (a 512² latent grid, C=320, fp16; first, so a spent time budget never
    drops it), then every dtype × pooled or not × gate (the depthwise bias on in half of each dtype's cases) on odd
    and non-square grids. Smoke (Triton's interpreter runs every program as Python): tiny shapes, and every third
    case, which still covers each dtype, both gates, pooled and not, with and without bias."""
    if smoke:  # the interpreter unrolls the k×k taps into Python: k=3 keeps the larger case quick too
        grids, dim, k = [(5, 7), (6, 3)], 8, 3
        large = KernelCase(torch.float16, (9, 12), 16, 3, True, "scaled", False, batch=1)
    else:
        grids, dim, k = [(37, 23), (24, 41)], 64, 5
        large = KernelCase(torch.float16, (512, 512), 320, 7, True, "scaled", False, batch=1)
    found = [KernelCase(dtype, grids[gate == "sigmoid"], dim, k, pooled, gate, dw_bias=(gate == "sigmoid") != pooled)
             for dtype in (torch.float32, torch.float16, torch.bfloat16) for pooled in (False, True)
             for gate in ("scaled", "sigmoid")]
    return [large, *(found[::3] if smoke else found)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale


def random_block64(case: KernelCase, seed: int, device):
    """A float64 block holding values exactly representable in case.dtype (both sides use the same numbers), with
    non-zero biases so that every bias path counts."""
    torch.manual_seed(seed)
    block = build_student(case.config, dtype=torch.float64)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return block.to(case.dtype).to(device=device, dtype=torch.float64)


def check(case: KernelCase, device: str, seed: int = 0) -> dict:
    """One case: the relative errors of the forward and of the worst gradient, their tolerance, and whether the
    kernels really ran (a silent fall-back to the PyTorch path fails the case)."""
    block64 = random_block64(case, seed, device)
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(case.batch, *case.grid, case.dim, generator=gen, dtype=torch.float64)
    x64 = x64.to(case.dtype).to(device=device, dtype=torch.float64).requires_grad_()
    ref64 = block64(x64)
    with torch.no_grad():
        torch_path_error = relative_error(ref64, reference_block_forward(block64.state_dict(), case.config, x64))

    block = build_student(case.config, state_dict=block64.state_dict(), device=device, dtype=case.dtype)
    x = x64.detach().to(case.dtype).requires_grad_()
    on_kernels = kernels.use_triton(x) and len(case.config.scales) <= kernels.MAX_BRANCHES
    out = block(x)
    on_kernels = on_kernels and kernels.failure() is None
    with torch.no_grad():
        expected = reference_block_forward(block64.state_dict(), case.config, x64)
        forward_error = relative_error(out, expected)
        sampling_error = relative_error(block(x), expected)  # no autograd: the ½ scale pooled by the full-res launch
    # the upstream gradient scaled so that parameter gradients (sums over every pixel) stay in fp16's range
    gy = torch.randn(ref64.shape, generator=gen, dtype=torch.float64).to(device) / (case.grid[0] * case.grid[1]) ** 0.5
    ref64.backward(gy)
    out.backward(gy.to(case.dtype))
    params64 = dict(block64.named_parameters())
    grads = {"x": relative_error(x.grad, x64.grad),
             **{name: relative_error(p.grad, params64[name].grad) for name, p in block.named_parameters()}}
    worst = max(grads, key=grads.get)
    tol = TOL[case.dtype]
    passed = (on_kernels and kernels.failure() is None and torch_path_error < 1e-10 and forward_error <= tol
              and sampling_error <= tol and grads[worst] <= tol)
    return {"case": case.label, "dtype": str(case.dtype).replace("torch.", ""), "grid": list(case.grid),
            "dim": case.dim, "kernel_size": case.kernel_size, "pooled": case.pooled, "gate": case.gate,
            "dw_bias": case.dw_bias, "batch": case.batch, "path": "triton" if on_kernels else "torch",
            "kernel_failure": kernels.failure(), "torch_path_vs_reference": torch_path_error,
            "forward_error": forward_error, "sampling_error": sampling_error, "worst_gradient": worst,
            "worst_gradient_error": grads[worst],
            "gradient_errors": grads, "tolerance": tol, "passed": passed}


COLUMNS = [("case", lambda r: r["case"]), ("path", lambda r: r["path"]),
           ("forward error", lambda r: f"{r['forward_error']:.1e}"),
           ("sampling error", lambda r: f"{r['sampling_error']:.1e}" if "sampling_error" in r else "—"),
           ("worst gradient error", lambda r: f"{r['worst_gradient_error']:.1e} ({r['worst_gradient']})"),
           ("tolerance", lambda r: f"{r['tolerance']:.0e}"), ("result", lambda r: "pass" if r["passed"] else "FAIL")]
