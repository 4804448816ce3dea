"""torch.compile on the ΔConvBlock: one graph without breaks (plain and ComfyUI-casting layers), inductor equal to
eager, and the Triton kernel path left out of traced graphs."""
import pytest
import torch

from deltaconv_core import kernels
from deltaconv_core.block import BlockConfig
from deltaconv_core.students import build_student


def comfy_ops(pack):
    return pack.nodes.comfy_ops.COMFY_OPS


def explain(block, x):
    torch._dynamo.reset()
    return torch._dynamo.explain(block)(x)


@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
@pytest.mark.parametrize("layers", ["torch", "comfy"])
@pytest.mark.parametrize("frames", [0, 3], ids=["image", "video"])
def test_block_traces_as_one_graph(pack, layers, gate, frames):
    ops = {"ops": comfy_ops(pack)} if layers == "comfy" else {}
    config = BlockConfig(dim=32, kernel_size=3, gate=gate, scales=(1.0, 0.5, 0.25), dw_bias=True,
                         time_kernel=3 if frames else 0)
    block = build_student(config, **ops)
    result = explain(block, torch.randn(2, *((frames,) if frames else ()), 6, 5, 32))
    assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons


def test_kernel_path_is_not_traced(monkeypatch):
    # Where the kernels would run (CUDA), a traced block still takes the torch path that inductor compiles.
    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    monkeypatch.setattr(kernels, "delta_conv_or_none", lambda *a: pytest.fail("kernel path traced"))
    block = build_student(BlockConfig(dim=16, kernel_size=3))
    result = explain(block, torch.randn(1, 4, 4, 16))
    assert result.graph_break_count == 0, result.break_reasons


@pytest.mark.parametrize("frames", [0, 3], ids=["image", "video"])
def test_inductor_matches_eager(frames):
    torch.manual_seed(0)
    block = build_student(BlockConfig(dim=32, kernel_size=5, scales=(1.0, 0.5), time_kernel=3 if frames else 0)).eval()
    if frames:
        torch.nn.init.normal_(block.conv_time.weight)
    x = torch.randn(2, *((frames,) if frames else ()), 7, 9, 32)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)
