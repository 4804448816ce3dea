"""ComfyUI's own TorchCompileModel node on a ΔConv-patched model, through a real server: the patched UNet traces
into graphs without breaks or per-step recompiles, and samples what eager sampling gives.

Its own server: ComfyUI's default CPU attention (sub-quadratic, which asks psutil for free memory) breaks graphs
by itself, patched or not, so this server uses PyTorch attention; dynamo's graph-break and recompile logs go to its
log. The `cudagraphs` backend runs the traced graphs as they are on a CPU, which keeps the test to seconds where
inductor would spend minutes compiling.
"""
import os
import re

import pytest
from graphs import digest, txt2img

from devkit.comfy_server import ComfyServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def compile_server(comfy_path, tiny_models, server):
    if "TorchCompileModel" not in server.get("/object_info"):
        pytest.skip("this ComfyUI has no TorchCompileModel node")
    s = ComfyServer(comfy_path, tiny_models, pack_dir=REPO, test_nodes_dir=os.path.join(TESTS, "test_nodes"),
                    extra_flags=["--use-pytorch-cross-attention"], env={"TORCH_LOGS": "graph_breaks,recompiles"},
                    name="compile_server")
    s.start()
    yield s
    s.stop()


def test_compiled_patched_model_has_no_graph_breaks_and_matches_eager(compile_server, unet_inputs):
    """ΔConv for the first half of sampling: two graphs (students on, students off), so exactly one recompile,
    triggered by the step's on/off flag; none per step, and no graph break."""
    def graph():
        return txt2img("sd15", "tiny_sd15_random.safetensors", seed=51, steps=4, end=0.5, unet_inputs=unet_inputs)

    eager = digest(compile_server.run(graph()))
    log_start = len(compile_server.log_text())
    compiled_graph = graph()  # ... → ΔConv Patch → TorchCompileModel → KSampler
    compiled_graph["compile"] = {"class_type": "TorchCompileModel",
                                 "inputs": {"model": ["patch", 0], "backend": "cudagraphs"}}
    for node in ("sampler", "digest"):
        compiled_graph[node]["inputs"]["model"] = ["compile", 0]
    compiled = digest(compile_server.run(compiled_graph, timeout=900))
    log = compile_server.log_text()[log_start:]
    assert "Graph break" not in log, log[-3000:]
    failed_guards = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (\S+)", log)
    assert len(failed_guards) == 1 and failed_guards[0].endswith("runtime.step_active"), log[-3000:]
    assert compiled["finite"] and compiled["shape"] == eager["shape"]
    assert abs(compiled["mean_abs"] - eager["mean_abs"]) <= 1e-4 * eager["mean_abs"]
