"""ΔConv Distill and ΔConv Distill (simple) on the tiny Wan model, in-process (as ComfyUI runs nodes: inference
mode): mediator students on video latents [N, C, T, H, W] at the model's flow noise levels, both stages, resume and
gradient checkpointing; image latents, and students that do not run on video grids, refused naming what to do."""
import pytest
import torch

from deltaconv_core.attention import TeacherSwitch
from deltaconv_core.block import BlockConfig
from deltaconv_core.distill import DistillConfig, Distiller, DistillError
from deltaconv_core.families import find_attention_sites
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.students import STUDENTS, build_student
from deltaconv_core.weights import DeltaConvWeights, load_weights, read_training_state
from devkit.tiny_models import SITE_COUNTS, has_wan

pytestmark = pytest.mark.skipif(not has_wan(), reason="this ComfyUI has no Wan")
SITES = SITE_COUNTS["tiny_wan"]


@pytest.fixture(scope="module")
def wan(load_tiny):
    return load_tiny("tiny_wan")


@pytest.fixture(scope="module")
def data():
    """Two video latents of 3 latent frames at 8 × 12 (Wan's 16 channels; tokens 3 × 4 × 6); T5-wide text."""
    g = torch.Generator().manual_seed(0)
    return ({"samples": torch.randn(2, 16, 3, 8, 12, generator=g)}, [[torch.randn(1, 16, 4096, generator=g), {}]],
            [[torch.zeros(1, 16, 4096), {}]])


def run(pack, model, data, stage="A", steps=3, latents=None, **kw):
    default_latents, pos, neg = data
    args = dict(stage=stage, steps=steps, learning_rate=1e-3, batch_size=2, seed=3, save_every=0,
                filename_prefix="w", negative=neg, warmup_steps=0, training_dtype="fp32", allow_cpu=True,
                student="mediators")
    args.update(kw)
    with torch.inference_mode():  # ComfyUI executes every node under inference mode
        return pack.nodes.distill.DeltaConvDistill().distill(model, latents or default_latents, pos, **args)


def _tensors(weights):
    return {f"{n}.{k}": v for n, (_, sd) in weights.students.items() for k, v in sd.items()}


def test_noise_levels_follow_the_model_sampling(pack, wan, load_tiny):
    """ComfyUI noises flow models (Wan) as x_t = (1 − σ)·x_0 + σ·ε, ε-prediction models as x_0 + σ·ε."""
    scale = pack.nodes.comfy_denoiser.signal_scale
    sigma = torch.tensor([0.25, 1.0]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(scale(wan)(sigma), 1 - sigma)
    torch.testing.assert_close(scale(load_tiny("tiny_sd15"))(sigma.view(-1, 1, 1, 1)), torch.ones(2, 1, 1, 1))
    table = pack.nodes.comfy_denoiser.sigma_table(wan)
    assert float(table.min()) > 0 and float(table.max()) <= 1  # flow sigmas: x_t between the latent and the noise


def test_flow_noising_recovers_the_noise():
    """The engine noises with the model's signal scale and inverts it: a denoiser returning the true x_0 gives
    ε̂ = ε exactly (with the ε-prediction formula it would not)."""
    latent = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    inputs = []

    def denoise(x_t, sigma, negative, index):
        inputs.append(x_t)
        return latent.expand_as(x_t)

    dummy = build_student(BlockConfig(4, 3, (1.0,), "scaled"))  # the engine needs a student to train; unused here
    distiller = Distiller(denoise, TeacherSwitch(), {"site": dummy}, latent, torch.linspace(0.1, 1.0, 10),
                          DistillConfig(batch_size=1), signal_scale=lambda s: 1 - s)
    batch = distiller.sample_batch()
    eps = distiller._forward(batch, teacher=False)
    sigma = batch.sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(inputs[0], (1 - sigma) * latent + sigma * batch.noise)
    torch.testing.assert_close(eps, batch.noise)


def test_stage_a_records_every_site_and_trains_it(pack, wan, data, out_dir):
    """The teacher forwards run inside the patch's model wrapper, so the sites find their grid and record (else
    the run stops: no teacher activations recorded)."""
    weights, loss, path = run(pack, wan, data, "A", steps=4)
    losses = loss["loss"]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert weights.family == "wan" and set(weights.students) == {f"blocks.{i}" for i in range(SITES)}
    assert all(cfg.student == "mediators" for cfg, _ in weights.students.values())
    assert any(float(v.abs().max()) > 0 for k, v in _tensors(weights).items() if ".dwc" in k)  # zero-initialised
    assert load_weights(path).family == "wan"


def _site_errors(wan, data, weights) -> list[float]:
    """Per site, the MSE of its student against the site's own attention on one fixed call of the tiny model, as
    training makes them (a data latent noised at σ 0.5 with fresh noise, the prompt; a 3 × 4 × 6 grid), the
    student at its last setting."""
    model = wan.model.diffusion_model
    g = torch.Generator().manual_seed(5)
    x0 = data[0]["samples"][:1]
    inputs = {"x": 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=g), "timestep": torch.full((1,), 500.0),
              "context": data[1][0][0]}
    seen = {}
    hooks = [model.get_submodule(f"blocks.{i}.self_attn").register_forward_hook(
        lambda m, args, out, i=i: seen.update({i: (args[0], out)})) for i in range(SITES)]  # returns None
    with torch.no_grad():
        model(**inputs)
        for h in hooks:
            h.remove()
        errors = []
        for i in range(SITES):
            cfg, state = weights.students[f"blocks.{i}"]
            student = build_student(cfg)
            student.load_state_dict(state)
            setting = cfg.schedule.counts[-1] if cfg.schedule is not None else None
            x, out = seen[i]
            errors.append(float(torch.nn.functional.mse_loss(student.run(x, (3, 4, 6), setting), out)))
    return errors


def _fresh_and_trained(pack, wan, data, student, learning_rate):
    model = wan.model.diffusion_model
    fresh = DeltaConvWeights.fresh_students(student, find_attention_sites(model), model, seed=3,
                                            schedule=MediatorSchedule.parse("4"))  # the run's seed: its start
    trained, _, _ = run(pack, wan, data, "A", steps=12, learning_rate=learning_rate, student=student,
                        mediator_schedule="4")
    return _site_errors(wan, data, fresh), _site_errors(wan, data, trained)


def test_stage_a_deltaconv_learns_the_self_attention_output(pack, wan, data, out_dir):
    """Fresh 3-D ΔConv blocks move towards the teacher's self-attention output on a call they were not trained on
    (measured: 0.034 → 0.015 and 0.099 → 0.020)."""
    before, after = _fresh_and_trained(pack, wan, data, "deltaconv", 1e-3)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)


def test_stage_a_mediators_stay_near_their_teacher_start(pack, wan, data, out_dir):
    """Mediator students start from the teacher's own projections, already close on this random model (what they
    miss is RoPE's positional part, left to the zero-initialised DWCs); 12 small stage A steps keep them there
    (measured: 0.0033 → 0.0034 and 0.0019 → 0.0020; lr 1e-3 moves them away at first, to 0.0041 and 0.0043)."""
    before, after = _fresh_and_trained(pack, wan, data, "mediators", 2e-4)
    assert all(a < 1.25 * b for a, b in zip(after, before)), (before, after)


def test_stage_b_trains_end_to_end(pack, wan, data, out_dir):
    start, _, _ = run(pack, wan, data, "A", steps=1, filename_prefix="start")
    weights, loss, _ = run(pack, wan, data, "B", steps=3, deltaconv=start)
    assert len(loss["loss"]) == 3 and all(map(torch.isfinite, torch.tensor(loss["loss"])))
    a, b = _tensors(start), _tensors(weights)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_training(pack, wan, data, out_dir):
    plain, loss_plain, _ = run(pack, wan, data, "B", steps=2, filename_prefix="plain")
    ckpt, loss_ckpt, _ = run(pack, wan, data, "B", steps=2, filename_prefix="ckpt", gradient_checkpointing=True)
    assert loss_ckpt["loss"] == pytest.approx(loss_plain["loss"], rel=1e-5)
    a, b = _tensors(plain), _tensors(ckpt)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert "forward" not in vars(wan.model.diffusion_model.blocks[0])  # the checkpointing wrappers are gone


@pytest.mark.parametrize("stage", ["A", "B"])
def test_resume_equals_uninterrupted(pack, wan, data, out_dir, stage):
    full, _, _ = run(pack, wan, data, stage, steps=4, filename_prefix="full")
    _, _, path = run(pack, wan, data, stage, steps=2, filename_prefix="part")
    assert read_training_state(path)[1]["step"] == 2
    resumed, loss, _ = run(pack, wan, data, stage, steps=4, filename_prefix="part", deltaconv=load_weights(path))
    assert len(loss["loss"]) == 4
    a, b = _tensors(full), _tensors(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_image_latents_are_refused(pack, wan, data, out_dir):
    with pytest.raises(DistillError, match=r"shape \[2, 16, 8, 12\].*16-channel latents \[N, C, T, H, W\]: encode "
                                           r"the videos"):
        run(pack, wan, data, latents={"samples": torch.zeros(2, 16, 8, 12)})


def test_students_without_video_grids_are_refused_naming_mediators(pack, wan, data, out_dir, monkeypatch):
    """ΔConv blocks as they were before video blocks (2-D only): the node names the student that runs on Wan."""
    monkeypatch.setattr(STUDENTS["deltaconv"], "grid_dims", (2,))
    with pytest.raises(DistillError, match=r"student = 'deltaconv': a ΔConv block runs on 2-D token grids.*Wan "
                                           r"2.x has 3-D ones; its sites take: mediators; set student to one"):
        run(pack, wan, data, student="deltaconv")
    assert not out_dir.exists() or not list(out_dir.rglob("*.safetensors"))


def test_simple_check_preset_trains_video_deltaconv_blocks(pack, wan, data, out_dir):
    """The simple node has no student widget: on a video model, as on images, it trains ΔConv blocks (3-D ones)."""
    latents, pos, neg = data
    with torch.inference_mode():
        weights, loss, path = pack.nodes.distill_simple.DeltaConvDistillSimple().distill(
            wan, latents, pos, "check", "simple", negative=neg)
    assert len(loss["loss"]) == 4 and all(map(torch.isfinite, torch.tensor(loss["loss"])))
    assert {(cfg.student, cfg.time_kernel > 0) for cfg, _ in weights.students.values()} == {("deltaconv", True)}
    assert read_training_state(path)[1]["config"]["stage"] == "B"
