"""ΔConv Distill and ΔConv Save on a tiny real SD1.5 model, in-process (as ComfyUI runs nodes: inference mode)."""
import glob
import os

import pytest
import torch

from deltaconv_core.distill import DistillError
from deltaconv_core.weights import load_weights, read_training_state


@pytest.fixture(scope="module")
def sd15(load_tiny):
    return load_tiny("tiny_sd15")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return ({"samples": torch.randn(4, 4, 8, 8, generator=g)}, [[torch.randn(1, 16, 768, generator=g), {}]],
            [[torch.zeros(1, 16, 768), {}]])


def run(pack, model, data, stage="A", steps=6, latents=None, **kw):
    default_latents, pos, neg = data
    args = dict(stage=stage, steps=steps, learning_rate=1e-3,
                batch_size=2, seed=3, save_every=0, filename_prefix="t", negative=neg, warmup_steps=0,
                training_dtype="fp32", allow_cpu=True)
    args.update(kw)
    with torch.inference_mode():  # ComfyUI executes every node under inference mode
        return pack.nodes.distill.DeltaConvDistill().distill(model, latents or default_latents, pos, **args)


def _mean(xs):
    return sum(xs) / len(xs)


def _stage_b_supported(pack):
    return not pack.nodes.compat.LEGACY_ATTN1_CALL  # ComfyUI before mid-2024 adds residuals in place


def test_stage_b_on_older_comfyui_explains(pack, sd15, data, out_dir):
    if _stage_b_supported(pack):
        pytest.skip("this ComfyUI supports stage B")
    with pytest.raises(DistillError, match=r"stage B cannot backpropagate.*update ComfyUI, or use stage A"):
        run(pack, sd15, data, "B", steps=2)


@pytest.mark.parametrize("stage, drop", [("A", 0.5), ("B", 0.97)])
def test_stages_lower_their_loss(pack, sd15, data, out_dir, stage, drop):
    if stage == "B" and not _stage_b_supported(pack):
        pytest.skip("stage B needs ComfyUI from mid-2024 on")
    _, loss, path = run(pack, sd15, data, stage, steps=30)
    losses = loss["loss"]
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert _mean(losses[-5:]) < drop * _mean(losses[:5]), losses
    assert os.path.basename(path) == f"t_00001_{stage}_0000030.safetensors" and load_weights(path).family == "sd1"


def _tensors(weights):
    return {f"{n}.{k}": v for n, (_, sd) in weights.students.items() for k, v in sd.items()}


@pytest.mark.parametrize("stage", ["A", "B"])
def test_interrupt_and_resume_equals_uninterrupted(pack, sd15, data, out_dir, stage):
    if stage == "B" and not _stage_b_supported(pack):
        pytest.skip("stage B needs ComfyUI from mid-2024 on")
    full, _, _ = run(pack, sd15, data, stage, steps=6, filename_prefix="full")
    first, _, path = run(pack, sd15, data, stage, steps=3, filename_prefix="part")
    assert read_training_state(path)[1]["step"] == 3
    resumed, loss, _ = run(pack, sd15, data, stage, steps=6, filename_prefix="part", deltaconv=load_weights(path))
    assert len(loss["loss"]) == 6
    a, b = _tensors(full), _tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(_tensors(first)[k], a[k]) for k in a)  # the test compares trained weights


def test_nan_loss_stops_and_keeps_last_good_weights(pack, sd15, data, out_dir):
    latents = data[0]["samples"].clone()
    latents[3] = float("nan")  # the first batch that draws latent 3 poisons the loss
    with pytest.raises(DistillError, match=r"loss became nan at step (\d+).*Last good blocks saved to") as e:
        run(pack, sd15, data, steps=40, batch_size=1, latents={"samples": latents})
    step = int(e.value.args[0].split("at step ")[1].split(";")[0])
    assert step > 1
    saved = sorted(glob.glob(str(out_dir / "*.safetensors")))
    assert [os.path.basename(p) for p in saved] == [f"t_00001_A_{step - 1:07d}.safetensors"]
    assert all(torch.isfinite(v).all() for v in _tensors(load_weights(saved[0])).values())


def test_out_of_memory_gives_advice_and_keeps_the_checkpoint(pack, sd15, data, out_dir, monkeypatch):
    from deltaconv_core import distill as engine

    real_step, calls = engine.Distiller.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self)

    monkeypatch.setattr(engine.Distiller, "step", step)
    with pytest.raises(DistillError, match=r"out of memory.*batch_size.*gradient_checkpointing.*stage A.*"
                                           r"t_00001_A_0000004.safetensors \(intact\)"):
        run(pack, sd15, data, steps=10, save_every=2)
    assert read_training_state(str(out_dir / "t_00001_A_0000004.safetensors"))[1]["step"] == 4
    assert not glob.glob(str(out_dir / ".deltaconv-*"))  # no half-written files


@pytest.mark.parametrize("kw, message", [
    ({"latents": {"samples": torch.zeros(2, 16, 8, 8)}}, r"shape \[2, 16, 8, 8\].*4-channel latents"),
    ({"batch_size": 9}, "batch_size 9 is larger than the 4 training latents"),
    ({"allow_cpu": False}, "runs on the CPU.*allow_cpu"),
    ({"kernel_preset": "{\"nope\": 3}"}, r"kernel_preset names 1 block\(s\) this model does not have"),
])
def test_bad_input_messages(pack, sd15, data, out_dir, kw, message):
    with pytest.raises((DistillError, ValueError), match=message):
        run(pack, sd15, data, **kw)
    assert not os.path.exists(out_dir) or not os.listdir(out_dir)


def test_empty_conditioning(pack, sd15, data, out_dir):
    latents, _, _neg = data
    with pytest.raises(DistillError, match="positive CONDITIONING is empty"), torch.inference_mode():
        pack.nodes.distill.DeltaConvDistill().distill(sd15, latents, [], "A", 2, 1e-3, 1, 0, 0, "t",
                                                      allow_cpu=True)


def test_kernel_preset_sets_kernel_sizes(pack, sd15, data, out_dir):
    weights, _, _ = run(pack, sd15, data, steps=1, kernel_preset="5")
    assert {cfg.kernel_size for cfg, _ in weights.students.values()} == {5}


def test_save_node_never_overwrites_unasked(pack, tmp_path, monkeypatch, sd15, data, out_dir):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: [str(tmp_path / "models")])
    weights, _, _ = run(pack, sd15, data, steps=1)
    save = pack.nodes.save.DeltaConvSave()
    path = save.save(weights, "mine", False)["result"][0]
    assert path == str(tmp_path / "models" / "mine.safetensors") and load_weights(path).family == "sd1"
    before = os.path.getmtime(path)
    with pytest.raises(FileExistsError, match="turn on overwrite"):
        save.save(weights, "mine", False)
    assert os.path.getmtime(path) == before
    assert save.save(weights, "mine.safetensors", True)["result"][0] == path
    with pytest.raises(ValueError, match="filename"):
        save.save(weights, "../escape", False)


def test_gradient_checkpointing_gives_the_same_training(pack, sd15, data, out_dir):
    if not _stage_b_supported(pack):
        pytest.skip("stage B needs ComfyUI from mid-2024 on")
    plain, loss_plain, _ = run(pack, sd15, data, "B", steps=3, filename_prefix="plain")
    ckpt, loss_ckpt, _ = run(pack, sd15, data, "B", steps=3, filename_prefix="ckpt", gradient_checkpointing=True)
    assert loss_ckpt["loss"] == pytest.approx(loss_plain["loss"], rel=1e-5)
    a, b = _tensors(plain), _tensors(ckpt)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    dm = sd15.model.diffusion_model
    assert "forward" not in vars(dm.input_blocks[1])  # the checkpointing wrappers are gone afterwards
