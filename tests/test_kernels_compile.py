"""Every fused kernel, forward and backward, in every configuration the host code can launch, compiled to cubin for
sm_80 and sm_90 by Triton's own toolchain: no GPU needed. It catches what Triton's CPU interpreter lets through
(tl.dot block shapes ≥ 16 and operand dtypes, constexpr branches, pointer types).

Compiled: fp32/fp16/bf16 × {the dwconv+gate forward: bias or not, both gates, pooled or not; its three backward
kernels: gate (bias or not, both gates), input, weight; the output projection: 1–4 branches, and for fp32 both
tf32 and exact}; launch configurations (tiles, warps, stages) come from the kernels' own host code, for a 64×64
latent with 320 channels at the largest official kernel size (13). Runs in a subprocess without TRITON_INTERPRET
(there @triton.jit gives compilable functions), two compiles at a time, cached in .cache/triton.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPILE_ALL = r'''
import itertools
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deltaconv_core.kernels import dwconv_gate, output_projection

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FP32_BUFFERS = ("dvc_ptr", "part_ptr")  # gradient buffers accumulated in fp32 whatever the storage dtype
FLOATS = ("gate_constant", "sh1", "sw1", "sh2", "sw2", "sh3", "sw3")
K, H, W, C = 13, 64, 64, 320  # gate input C_i = 320: the gated halves have 160 channels


def configurations(arch):
    """(kernel name, dtype, constexprs, num_warps, num_stages) for everything the host code launches."""
    for dtype in DTYPES:
        half = dwconv_gate._blocks(H, W, C // 2, True)
        full = dwconv_gate._blocks(H, W, C, True)
        for bias, sigmoid in itertools.product((True, False), repeat=2):
            for pool in (True, False):
                yield ("_fwd_kernel", dtype, dict(K=K, HAS_BIAS=bias, SIGMOID=sigmoid, POOL=pool, **half),
                       dwconv_gate._num_warps(half), 3)
            yield ("_bwd_gate_kernel", dtype, dict(K=K, HAS_BIAS=bias, SIGMOID=sigmoid, **half),
                   dwconv_gate._num_warps(half), 3)
        yield "_bwd_input_kernel", dtype, dict(K=K, **full), dwconv_gate._num_warps(full), 3
        yield "_bwd_weight_kernel", dtype, dict(K=K, BLOCK_N=64, BLOCK_C=full["BLOCK_C"]), 4, 3
        for branches in range(1, output_projection.MAX_BRANCHES + 1):
            for precision in (("ieee", "tf32") if dtype == torch.float32 else ("tf32",)):
                blocks, warps, stages = output_projection._launch_config(H * W, C, C // 2, branches, dtype,
                                                                         (arch // 10, arch % 10))
                yield ("_projection_kernel", dtype, dict(BRANCHES=branches, UPCAST=False, PRECISION=precision,
                                                         **blocks), warps, stages)


def compile_one(job):
    arch, name, dtype, constexprs, warps, stages = job
    fn = getattr(dwconv_gate if hasattr(dwconv_gate, name) else output_projection, name)
    signature = {n: "constexpr" if n in constexprs else ("*fp32" if n in FP32_BUFFERS else "*" + DTYPES[dtype])
                 if n.endswith("_ptr") else "fp32" if n in FLOATS else "i32" for n in fn.arg_names}
    try:
        triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
        return None
    except Exception as e:  # noqa: BLE001  (report every failing configuration, not just the first)
        return f"sm_{arch} {name} {DTYPES[dtype]} {constexprs}: {type(e).__name__}: {str(e)[:500]}"


if __name__ == "__main__":
    jobs = [(arch, *config) for arch in (80, 90) for config in configurations(arch)]
    with ProcessPoolExecutor(2) as pool:
        failures = [f for f in pool.map(compile_one, jobs) if f]
    print("\n".join(failures))
    print(f"compiled {len(jobs) - len(failures)} of {len(jobs)}")
    sys.exit(1 if failures else 0)
'''


def test_every_kernel_configuration_compiles_for_sm80_and_sm90(tmp_path):
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    script = tmp_path / "compile_all.py"
    script.write_text(COMPILE_ALL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO  # deltaconv_core alone, as a top-level package: nothing of ComfyUI is imported
    env.setdefault("TRITON_CACHE_DIR", os.path.join(REPO, ".cache", "triton"))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "compiled 116 of 116" in result.stdout, result.stdout[-3000:]
