"""The ops a forward runs, recorded without running it: each op's multiply-accumulates and the bytes it reads and
writes, on meta tensors (shapes only) or on fake CUDA tensors (the CUDA path's ops and dtypes, with no GPU and no
memory: any CUDA build of torch).

MACs come from torch's own FLOP formulas (torch.utils.flop_counter, FLOPs / 2), with one addition: an in-place op
counts as its out-of-place form, which torch's counter leaves out (ΔConv's second branch is `baddbmm_`). A call of
F.scaled_dot_product_attention is one op, as the fused kernel a GPU runs is (on meta and fake tensors torch would
decompose it into its math path, and torch's counter has no formula for the CPU's fused kernel): QKᵀ and AV,
B·heads·L_q·L_k·(d + d_v) MACs, reading q, k, v and writing out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that move no data (views and metadata): not a launch, no bytes.
VIEWS = frozenset(("view", "_unsafe_view", "t", "permute", "expand", "detach", "unsqueeze", "reshape", "transpose",
                   "slice", "select", "split", "split_with_sizes", "chunk", "squeeze", "alias", "as_strided",
                   "empty", "empty_strided", "sym_size", "sym_stride", "sym_numel", "is_same_size"))
GEMMS = frozenset(("mm", "addmm", "bmm", "baddbmm", "baddbmm_", "addmm_"))


@dataclass(frozen=True)
class Op:
    name: str  # the aten op
    kind: str  # "gemm", "attention" (an SDPA kernel), "conv", or "memory" (everything else)
    macs: int
    bytes: int  # the tensors it reads and writes
    half: bool  # fp16/bf16 inputs (an fp32 SDPA or convolution runs on CUDA cores)


def _kind(name: str) -> str:
    if name in GEMMS:
        return "gemm"
    if "scaled_dot_product" in name or name in ("_flash_attention_forward", "_efficient_attention_forward"):
        return "attention"
    return "conv" if name.startswith(("convolution", "cudnn_convolution")) else "memory"


def _macs(func, args, kwargs, out) -> int:
    # Imported here: it imports triton, which gpu_check's smoke mode must import only after it sets TRITON_INTERPRET.
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    formula = flop_registry.get(packet)
    if formula is None and packet.__name__.endswith("_"):  # in place: the out-of-place op's formula
        formula = flop_registry.get(getattr(torch.ops.aten, packet.__name__[:-1], None))
    return 0 if formula is None else formula(*args, **kwargs, out_val=out) // 2


class RecordOps(TorchDispatchMode):
    """Every op that reaches the dispatcher (after torch's own decompositions, e.g. linear → addmm), in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.inside_sdpa = False  # recorded as one op already: its decomposition is not recorded again

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if not self.inside_sdpa and func.namespace == "aten" and name not in VIEWS:
            inputs = [t for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)]
            tensors = inputs + [t for t in tree_leaves(out) if torch.is_tensor(t)]
            self.ops.append(Op(name, _kind(name), _macs(func, args, kwargs, out),
                               sum(t.numel() * t.element_size() for t in tensors),
                               any(t.dtype in (torch.float16, torch.bfloat16) for t in inputs)))
        return out


class _SdpaAsOneOp(TorchFunctionMode):
    def __init__(self, recorder: RecordOps):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        self.recorder.inside_sdpa = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.inside_sdpa = False
        macs = math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        moved = sum(t.numel() * t.element_size() for t in (q, k, v, out))
        self.recorder.ops.append(Op("scaled_dot_product_attention", "attention", macs, moved,
                                    q.dtype in (torch.float16, torch.bfloat16)))
        return out


def record(fn, *args) -> list[Op]:
    """The ops of fn(*args) (no gradients)."""
    with torch.no_grad(), RecordOps() as recorder, _SdpaAsOneOp(recorder):
        fn(*args)
    return recorder.ops


def macs(fn, *args) -> int:
    return sum(op.macs for op in record(fn, *args))


def fake_cuda() -> FakeTensorMode:
    """A context in which tensors made on "cuda" are fake: the CUDA path's ops, dtypes and shapes, no GPU needed."""
    return FakeTensorMode()
