"""ΔConv Distill (simple), in-process: what each preset expands to, and the refusals before any training."""
import pytest
import torch

from deltaconv_core.distill import DistillError

CPU = torch.device("cpu")
# preset → (stage, steps) of each phase, as the preset's tooltip says
PHASES = {"quick": [("A", 2000)], "full": [("A", 2000), ("B", 10000)], "fine_tune": [("B", 2000)],
          "check": [("A", 2), ("B", 2)]}
# the names older releases saved
OLD_FINE_TUNE = "fine-tune connected blocks: stage B, 2000 steps at a low learning rate"
OLD_QUICK = "quick: stage A, 2000 steps"


@pytest.fixture(scope="module")
def simple(pack):
    return pack.nodes.distill_simple


def test_presets_expand_to_every_distill_setting(pack, simple):
    from_validation = pack.nodes.validation
    distill = pack.nodes.distill.DeltaConvDistill
    widgets = set(simple.advanced_defaults())
    assert {"stage", "steps", "learning_rate", "kernel_preset", "allow_cpu"} <= widgets
    assert list(simple.PRESETS) == list(PHASES)
    for preset, phases in PHASES.items():
        settings = simple.preset_settings(preset, "runs/x", n_latents=2, device=CPU)
        assert [(s["stage"], s["steps"]) for s in settings] == phases, preset
        for s in settings:
            assert set(s) == widgets, preset
            assert from_validation.check_widgets(distill, s) is True, (preset, s)
            assert s["batch_size"] == 2 and s["training_dtype"] == "fp32" and s["filename_prefix"] == "runs/x"
            assert s["allow_cpu"] == preset.startswith("check")
    full = simple.preset_settings("full", "x", n_latents=8, device=CPU)
    assert full[0]["batch_size"] == 4 and full[1]["min_snr_gamma"] == 5.0 and full[1]["gradient_checkpointing"]


@pytest.mark.parametrize("preset", ["fine_tune", OLD_FINE_TUNE])
def test_fine_tune_needs_blocks(simple, preset):
    with pytest.raises(DistillError, match="fine_tune preset trains the blocks connected as deltaconv"):
        simple.DeltaConvDistillSimple().distill(None, {"samples": torch.zeros(2, 4, 8, 8)}, [], preset, "x")


@pytest.mark.parametrize("preset", ["quick", OLD_QUICK])
def test_long_presets_refuse_the_cpu(simple, preset):
    with pytest.raises(DistillError, match=r"the quick preset would take days.*check preset runs on the CPU"):
        simple.DeltaConvDistillSimple().distill(None, {"samples": torch.zeros(2, 4, 8, 8)}, [], preset, "x")


def test_validate_inputs(simple):
    node = simple.DeltaConvDistillSimple
    assert node.VALIDATE_INPUTS(preset="check", filename_prefix="runs/a") is True
    assert node.VALIDATE_INPUTS(preset=OLD_QUICK, filename_prefix="runs/a") is True
    assert "is not one of the choices: 'quick', 'full'" in node.VALIDATE_INPUTS(preset="fast", filename_prefix="a")
    assert "'..' leads out of the folder" in node.VALIDATE_INPUTS(preset="quick", filename_prefix="../a")
