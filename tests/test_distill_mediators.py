"""ΔConv Distill with mediator-attention students on a tiny real SD1.5 model, in-process (under inference mode, as
ComfyUI runs nodes): every count of the schedule trained at its own noise levels, stage A and B, the schedule saved."""
import pytest
import torch

from deltaconv_core import distill as engine
from deltaconv_core.distill import DistillConfig, DistillError
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import MediatorAttention, MediatorConfig
from deltaconv_core.weights import DeltaConvWeights, load_weights

SCHEDULE = "0.0:2,0.5:8"


@pytest.fixture(scope="module")
def sd15(load_tiny):
    return load_tiny("tiny_sd15")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return ({"samples": torch.randn(2, 4, 8, 8, generator=g)}, [[torch.randn(1, 16, 768, generator=g), {}]],
            [[torch.zeros(1, 16, 768), {}]])


def run(pack, model, data, stage="A", steps=4, **kw):
    latents, pos, neg = data
    args = dict(stage=stage, steps=steps, learning_rate=1e-3,
                batch_size=2, seed=3, save_every=0, filename_prefix="m", negative=neg, warmup_steps=0,
                training_dtype="fp32", allow_cpu=True, student="mediators", mediator_schedule=SCHEDULE)
    args.update(kw)
    with torch.inference_mode():  # ComfyUI executes every node under inference mode
        return pack.nodes.distill.DeltaConvDistill().distill(model, latents, pos, **args)


def _stage_b_supported(pack):
    return not pack.nodes.compat.LEGACY_ATTN1_CALL  # ComfyUI before mid-2024 adds residuals in place


@pytest.mark.parametrize("stage", ["A", "B"])
def test_each_count_trains_at_its_noise_levels(pack, sd15, data, out_dir, monkeypatch, stage):
    if stage == "B" and not _stage_b_supported(pack):
        pytest.skip("stage B needs ComfyUI from mid-2024 on")
    seen = []  # (count, sigmas) per batch
    sample = engine.Distiller.sample_batch

    def spy(self, mediators=None):
        batch = sample(self, mediators)
        seen.append((mediators, self.teacher.mediators, batch.sigma.tolist()))
        return batch

    monkeypatch.setattr(engine.Distiller, "sample_batch", spy)
    _, loss, path = run(pack, sd15, data, stage)
    schedule = MediatorSchedule.parse(SCHEDULE)
    assert [c for c, _, _ in seen] == [schedule.training_count(step, 3) for step in range(4)]
    assert {c for c, _, _ in seen} == {2, 8} and all(c == forced for c, forced, _ in seen)
    sigma_counts = schedule.resolve(pack.nodes.compat.model_sampling(sd15).percent_to_sigma)
    assert all(sigma_counts(s) == c for c, _, sigmas in seen for s in sigmas)
    assert len(loss["loss"]) == 4 and all(map(torch.isfinite, torch.tensor(loss["loss"])))

    saved = load_weights(path)
    assert {type(cfg) for cfg, _ in saved.students.values()} == {MediatorConfig} and len(saved.students) == 7
    assert {cfg.schedule.format() for cfg, _ in saved.students.values()} == {"0.0:2,0.5:8"}
    fresh = DeltaConvWeights.fresh_mediators(pack.nodes.patching.find_attention_sites(sd15.model.diffusion_model),
                                             sd15.model.diffusion_model)
    name = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert not torch.equal(saved.students[name][1]["qkv.weight"], fresh.students[name][1]["qkv.weight"].float())
    assert saved.students[name][1]["dwc.weight"].abs().sum() > 0  # the zero-initialised DWC learned too


def test_stage_a_learns_the_attention_output(pack, sd15, data, out_dir):
    _, loss, _ = run(pack, sd15, data, steps=12, mediator_schedule="4")
    losses = loss["loss"]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_resume_with_another_schedule_saves_that_one(pack, sd15, data, out_dir):
    first, _, _ = run(pack, sd15, data, steps=1)
    _, _, path = run(pack, sd15, data, steps=2, deltaconv=first, mediator_schedule="16",
                          student="deltaconv")  # student applies to fresh students only
    assert {cfg.schedule.format() for cfg, _ in load_weights(path).students.values()} == {"0.0:16"}
    # Empty: the weights keep their own schedule.
    _, _, path = run(pack, sd15, data, steps=1, deltaconv=first, mediator_schedule="")
    assert {cfg.schedule.format() for cfg, _ in load_weights(path).students.values()} == {SCHEDULE}


def test_mixed_students_train_together(pack, sd15, data, out_dir):
    sites = pack.nodes.patching.find_attention_sites(sd15.model.diffusion_model)
    mixed = DeltaConvWeights.fresh(sites, seed=1)
    mediators = DeltaConvWeights.fresh_mediators(sites, sd15.model.diffusion_model, MediatorSchedule.parse(SCHEDULE))
    level0 = [s.name for s in sites.sites if s.level == 0]
    mixed.students.update({n: mediators.students[n] for n in level0})
    weights, loss, _ = run(pack, sd15, data, steps=2, deltaconv=mixed)
    kinds = {n: type(cfg).__name__ for n, (cfg, _) in weights.students.items()}
    assert kinds == {s.name: "MediatorConfig" if s.name in level0 else "BlockConfig" for s in sites.sites}
    assert all(map(torch.isfinite, torch.tensor(loss["loss"])))


@pytest.mark.parametrize("settings, message", [
    ({"student": "linear"}, "student must be one of"),
    ({"mediator_schedule": "0.5:4"}, r"mediator_schedule = '0.5:4': the first entry must start at 0.0"),
])
def test_bad_student_settings_refused(settings, message):
    with pytest.raises(DistillError, match=message):
        DistillConfig(**settings)


def test_mediator_students_need_their_schedule():
    blocks = {"a": MediatorAttention(MediatorConfig(8, 2))}
    with pytest.raises(DistillError, match="mediator students need their schedule"):
        engine.Distiller(lambda *a: None, engine.TeacherSwitch(), blocks, torch.zeros(1, 4, 2, 2),
                         torch.linspace(0.1, 10, 5), DistillConfig())
