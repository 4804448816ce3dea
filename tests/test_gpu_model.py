"""bench/gpu_model.py: its issue-time arithmetic on exact values, and the committed predictions consistent with
themselves (no speed-up above its own ceiling; `auto` never below attention, 1.0×, nor below every student)."""
import json
from pathlib import Path

import gpu_model
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_issue_time_arithmetic():
    d = gpu_model.DEVICES["h200"]
    rate = d.clock_ghz * 1e3  # warp-instructions per µs of one scheduler at full efficiency
    # 264 programs of 2 warps on 132 SMs: 2 per SM, 4 warps resident, one per scheduler (efficiency 0.6)
    assert gpu_model.issue_us(264, 2, 1000, 16, d) == pytest.approx(2 * 2 * 1000 / (4 * 0.6 * rate))
    # fewer programs than SMs: one program's latency, its single warp on one scheduler
    assert gpu_model.issue_us(10, 1, 1000, 16, d) == pytest.approx(1000 / (0.6 * rate))
    # 12 warps per SM resident (3 per scheduler): efficiency 0.9, two waves of 6 programs
    assert gpu_model.issue_us(132 * 12, 2, 1000, 6, d) == pytest.approx(12 * 2 * 1000 / (4 * 0.9 * rate))


def test_an_op_on_pytorch_ops_is_priced_by_its_kind():
    from op_count import Op

    d = gpu_model.DEVICES["h200"]
    price = lambda op, sdpa=500.0: gpu_model.op_us(op, d, sdpa)
    gemm = Op("addmm", "gemm", 10**12, 10**6, True)  # compute-bound: 2·MACs at the GEMM rate
    assert price(gemm) == pytest.approx(2e12 / (d.gemm_tflops * 1e6))
    assert price(Op("mul", "memory", 0, 7 * 10**9, True)) == pytest.approx(7e9 / (d.bandwidth_tbs * 1e6))
    assert price(Op("mul", "memory", 0, 64, True)) == d.launch_floor_us
    sdpa = Op("scaled_dot_product_attention", "attention", 10**11, 10**6, True)
    assert price(sdpa, 250.0) == pytest.approx(2 * price(sdpa, 500.0)) == pytest.approx(2e11 / 250e6)
    fp32 = Op("scaled_dot_product_attention", "attention", 10**11, 10**6, False)  # no tensor cores: CUDA cores
    assert price(fp32) == price(Op("convolution", "conv", 10**11, 10**6, True)) == pytest.approx(
        2e11 / (d.cuda_core_tflops * 1e6))
    (fast, slow), host = gpu_model.torch_path_us([gemm, sdpa], d)
    assert (fast, slow) == pytest.approx((price(gemm) + price(sdpa, d.sdpa_tflops[1]),
                                          price(gemm) + price(sdpa, d.sdpa_tflops[0])))
    assert host == 2 * d.host_us_per_op


def test_committed_predictions_are_consistent():
    files = sorted(RESULTS.glob("gpu_model_*.json"))
    assert files, "bench/results has no gpu_model_*.json: run python bench/gpu_model.py"
    for path in files:
        data = json.loads(path.read_text())
        assert data["meta"]["estimate"] is True
        for s in data["steps"]:
            for speedup, auto, ceiling in zip(s["speedup"], s["auto_speedup"], s["ceiling"]):
                assert speedup <= ceiling + 1e-9 and auto <= ceiling + 1e-9, (path.name, s)
                assert auto >= max(1.0, speedup) - 1e-9, (path.name, s)  # the model call's plans include both


def test_gpu_check_shows_the_models_prediction_beside_each_step():
    import gpu_check

    predicted = gpu_check.model_predictions("NVIDIA H200")
    steps = json.loads((RESULTS / "gpu_model_h200.json").read_text())["steps"]
    sd15 = next(s for s in steps if (s["family"], s["image"]) == ("sd15", 1024))
    assert predicted["sd15", 1024] == f"{min(sd15['speedup']):.2f}–{max(sd15['speedup']):.2f}×"
    assert gpu_check.model_predictions("NVIDIA H100 80GB HBM3") != predicted
