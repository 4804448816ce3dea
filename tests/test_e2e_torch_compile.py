"""ComfyUI's own TorchCompileModel node on a patched model (ΔConv and mediator students), through a real server: the
patched UNet traces into graphs without breaks or per-step recompiles, counts its student calls, and samples what
eager sampling gives.

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


@pytest.mark.parametrize("weights, end", [("tiny_sd15_random.safetensors", 0.5),
                                          ("tiny_sd15_mediators.safetensors", 1.0)])
def test_compiled_patched_model_has_no_graph_breaks_counts_and_matches_eager(compile_server, unet_inputs, weights,
                                                                             end):
    """One graph per step state (ΔConv for the first half: students on, off; mediators: 4, 16, 64), so
    recompiles only when the step state changes, never per step, and no graph break. The call counters count the
    compiled model's calls as they do the eager one's."""
    def graph():
        return txt2img("sd15", weights, seed=51, steps=4, end=end, unet_inputs=unet_inputs)

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
    states = len(eager["counts"])  # counter keys: one per step state ("deltaconv", "attention:sigma", "mediators:4")
    assert 2 <= states < 4, eager["counts"]  # some state repeats over the 4 steps
    recompiles = log.count("[__recompiles] Recompiling function")
    # Guards that failed: the step state, or (after the other case of this test) the other student's graphs.
    failed = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (.*)", log)
    assert 1 <= recompiles <= states and failed, log[-3000:]
    assert all("runtime.step." in g or "['student']" in g for g in failed), failed
    assert compiled["counts"] == eager["counts"], (compiled["counts"], eager["counts"])
    assert compiled["finite"] and compiled["shape"] == eager["shape"]
    assert abs(compiled["mean_abs"] - eager["mean_abs"]) <= 1e-4 * eager["mean_abs"]
