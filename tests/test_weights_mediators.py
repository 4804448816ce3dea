"""Weight files with mediator-attention students (deltaconv_core/weights.py, students.py): student type per site,
mixed files, schedules stored with the weights, old files, validation."""
import json

import comfy.ops
import pytest
import torch
from comfy.ldm.modules.attention import CrossAttention
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltaconv_core.block import BlockConfig, DeltaConvBlock
from deltaconv_core.families import AttentionSite, ModelSites
from deltaconv_core.mediator_schedule import MediatorSchedule
from deltaconv_core.mediators import MediatorAttention, MediatorConfig
from deltaconv_core.students import build_student, config_from_dict, student_type
from deltaconv_core.weights import DeltaConvWeights, WeightFileError, load_weights, match_sites, save_weights

DELTA_SITE = "down_blocks.0.attentions.0.transformer_blocks.0"
MEDIATOR_SITE = "down_blocks.0.attentions.1.transformer_blocks.0"
MEDIATOR_SITE_2 = "up_blocks.3.attentions.2.transformer_blocks.0"


def random_state(module, gen, dtype):
    return {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in module.state_dict().items()}


def mixed_weights(seed=0):
    """One ΔConv block and two mediator sites with different schedules, heads and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    delta = BlockConfig(16, 3, (1.0, 0.5), "scaled")
    med = MediatorConfig(16, 4, MediatorSchedule.parse("0.0:4,0.5:16,0.8:64"))
    med2 = MediatorConfig(8, 2, MediatorSchedule.fixed(9))
    blocks = {DELTA_SITE: (delta, random_state(build_student(delta, device="meta"), gen, torch.float32)),
              MEDIATOR_SITE: (med, random_state(MediatorAttention(med, device="meta"), gen, torch.bfloat16)),
              MEDIATOR_SITE_2: (med2, random_state(MediatorAttention(med2, device="meta"), gen, torch.float16))}
    return DeltaConvWeights("sd1", blocks, base_fingerprint="00112233aabbccdd", training={"student": "mixed"})


def metadata(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata(), list(f.keys())


# ----------------------------------------------------------------------------------------------- round trip
def test_mixed_file_round_trips(tmp_path):
    w = mixed_weights()
    path = save_weights(w, str(tmp_path / "mixed"))
    meta, keys = metadata(path)
    entries = json.loads(meta["blocks"])
    assert entries[MEDIATOR_SITE] == {"student": "mediators", "dim": 16, "heads": 4, "schedule": "0.0:4,0.5:16,0.8:64"}
    assert "student" not in entries[DELTA_SITE]  # ΔConv entries as before: older versions still read ΔConv files
    assert f"{MEDIATOR_SITE}.mediators.qkv.weight" in keys and f"{DELTA_SITE}.conv1.conv_up.weight" in keys

    back = load_weights(path)
    assert list(back.students) == list(w.students) and back.family == "sd1"
    assert back.base_fingerprint == w.base_fingerprint and back.training == w.training
    for name, (cfg, sd) in w.students.items():
        cfg2, sd2 = back.students[name]
        assert cfg2 == cfg and type(cfg2) is type(cfg)
        assert set(sd2) == set(sd)
        for key in sd:
            assert sd2[key].dtype == sd[key].dtype and torch.equal(sd2[key], sd[key]), (name, key)
        module = build_student(cfg2, sd2)  # strict
        assert isinstance(module, MediatorAttention if isinstance(cfg, MediatorConfig) else DeltaConvBlock)
    assert back.students[MEDIATOR_SITE_2][0].schedule == MediatorSchedule.fixed(9)
    assert [student_type(c) for c, _ in back.students.values()] == ["deltaconv", "mediators", "mediators"]
    summary = back.summary()
    assert "1 ΔConv blocks" in summary and "2 mediator-attention sites" in summary
    assert "0.0:4,0.5:16,0.8:64" in summary and "0.0:9" in summary


def test_mediator_only_file_round_trips(tmp_path):
    w = mixed_weights()
    del w.students[DELTA_SITE]
    back = load_weights(save_weights(w, str(tmp_path / "med.safetensors")))
    assert {n: c for n, (c, _) in back.students.items()} == {n: c for n, (c, _) in w.students.items()}
    assert "ΔConv blocks" not in back.summary() and "2 mediator-attention sites" in back.summary()


def test_file_without_student_types_loads_as_deltaconv(tmp_path):
    """A file as the pack wrote it before mediators existed: metadata entries are plain BlockConfig dicts."""
    cfg = BlockConfig(16, 5, (1.0, 0.5), "sigmoid")
    sd = build_student(cfg).state_dict()
    path = str(tmp_path / "old.safetensors")
    save_file({f"{DELTA_SITE}.conv1.{k}": v for k, v in sd.items()}, path, metadata={
        "deltaconv_format": "1", "family": "sd1", "base_fingerprint": "",
        "blocks": json.dumps({DELTA_SITE: {"dim": 16, "kernel_size": 5, "scales": [1.0, 0.5], "gate": "sigmoid",
                                           "dw_bias": False}}), "training": "{}"})
    back = load_weights(path)
    assert back.students[DELTA_SITE][0] == cfg and student_type(cfg) == "deltaconv"
    assert config_from_dict({**cfg.to_dict(), "student": "deltaconv"}) == cfg  # explicit type accepted too


# ------------------------------------------------------------------------------------------------- validation
def save_raw(tmp_path, entries, tensors):
    path = str(tmp_path / "raw.safetensors")
    save_file(tensors, path, metadata={"deltaconv_format": "1", "family": "sd1", "blocks": json.dumps(entries)})
    return path


def mediator_tensors(name, dim=16, change=None):
    sd = build_student(MediatorConfig(dim, 4)).state_dict()
    for key, shape in (change or {}).items():
        if shape is None:
            sd.pop(key)
        else:
            sd[key] = torch.zeros(shape)
    return {f"{name}.mediators.{k}": v for k, v in sd.items()}


GOOD = {"student": "mediators", "dim": 16, "heads": 4, "schedule": "0:4,0.5:16"}


@pytest.mark.parametrize("entry,match", [
    ({**GOOD, "student": "swin"}, "unknown student type 'swin'; known: deltaconv, mediators"),
    ({k: v for k, v in GOOD.items() if k != "heads"}, r"missing \['heads'\]"),
    ({**GOOD, "kernel_size": 3}, r"unexpected \['kernel_size'\]"),
    ({**GOOD, "heads": 5}, "divisible by the heads"),
    ({**GOOD, "schedule": "0.3:4"}, "first entry must start at 0.0"),
    ({**GOOD, "schedule": "0:4,0.5:0"}, "whole number"),
    ({**GOOD, "schedule": 16}, "MediatorSchedule"),
    ("mediators", "expected a JSON object"),
])
def test_bad_site_metadata_is_named(tmp_path, entry, match):
    path = save_raw(tmp_path, {MEDIATOR_SITE: entry}, mediator_tensors(MEDIATOR_SITE))
    with pytest.raises(WeightFileError, match=match) as err:
        load_weights(path)
    assert f"damaged ΔConv metadata for block '{MEDIATOR_SITE}'" in str(err.value)


def test_blocks_metadata_must_be_a_mapping(tmp_path):
    path = save_raw(tmp_path, [GOOD], mediator_tensors(MEDIATOR_SITE))
    with pytest.raises(WeightFileError, match=r"damaged ΔConv metadata.*not a mapping"):
        load_weights(path)


@pytest.mark.parametrize("key,found,expected", [("qkv.weight", (48, 12), (48, 16)), ("proj.bias", (12,), (16,)),
                                                ("dwc.weight", (5, 5, 16), (3, 3, 16)), ("qkv.bias", (16,), (48,))])
def test_wrong_mediator_shape_refused(tmp_path, key, found, expected):
    path = save_raw(tmp_path, {MEDIATOR_SITE: GOOD}, mediator_tensors(MEDIATOR_SITE, change={key: found}))
    with pytest.raises(WeightFileError) as err:
        load_weights(path)
    msg = str(err.value)
    assert f"{MEDIATOR_SITE}.mediators.{key}" in msg and str(list(found)) in msg and str(list(expected)) in msg


def test_missing_mediator_tensor_refused(tmp_path):
    path = save_raw(tmp_path, {MEDIATOR_SITE: GOOD}, mediator_tensors(MEDIATOR_SITE, change={"dwc.bias": None}))
    with pytest.raises(WeightFileError, match=f"missing tensor {MEDIATOR_SITE}.mediators.dwc.bias"):
        load_weights(path)


def test_student_type_must_match_tensors(tmp_path):
    delta = {f"{DELTA_SITE}.conv1.{k}": v for k, v in build_student(BlockConfig(16, 3)).state_dict().items()}
    with pytest.raises(WeightFileError, match=f"block {DELTA_SITE} is a mediators student in the metadata, but its "
                                              "tensors are deltaconv tensors"):
        load_weights(save_raw(tmp_path, {DELTA_SITE: GOOD}, delta))
    with pytest.raises(WeightFileError, match="is a deltaconv student in the metadata, but its tensors are mediators"):
        load_weights(save_raw(tmp_path, {MEDIATOR_SITE: BlockConfig(16, 3).to_dict()},
                              mediator_tensors(MEDIATOR_SITE)))


def test_site_with_both_kinds_of_tensors_refused(tmp_path):
    both = {**mediator_tensors(MEDIATOR_SITE),
            f"{MEDIATOR_SITE}.conv1.conv_up.weight": torch.zeros(8, 16)}
    with pytest.raises(WeightFileError, match=r"both ΔConv .* and mediator .* tensors"):
        load_weights(save_raw(tmp_path, {MEDIATOR_SITE: GOOD}, both))


def test_mediator_tensors_without_metadata_refused(tmp_path):
    path = str(tmp_path / "bare.safetensors")
    save_file(mediator_tensors(MEDIATOR_SITE), path)
    with pytest.raises(WeightFileError, match=r"mediator attention tensors .* without this pack's metadata"):
        load_weights(path)


# --------------------------------------------------------------------------------------- fresh and matching
class TinyUNet(nn.Module):
    """Just enough structure for site paths: two SD attn1 modules."""

    def __init__(self):
        super().__init__()
        ops = comfy.ops.disable_weight_init
        self.a = nn.ModuleDict({"attn1": CrossAttention(16, heads=4, dim_head=4, operations=ops)})
        self.b = nn.ModuleDict({"attn1": CrossAttention(8, heads=2, dim_head=4, operations=ops)})
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))


def test_fresh_mediators_from_the_model():
    model = TinyUNet()
    sites = (AttentionSite("a.attn1", MEDIATOR_SITE, 16, "down", 0, 7),
             AttentionSite("b.attn1", MEDIATOR_SITE_2, 8, "up", 0, 11))
    model_sites = ModelSites("sd1", "SD1.x UNet (2 sites)", sites)
    schedule = MediatorSchedule.parse("0:16,0.6:64")
    w = DeltaConvWeights.fresh_mediators(model_sites, model, schedule)
    assert {n: c for n, (c, _) in w.students.items()} == {MEDIATOR_SITE: MediatorConfig(16, 4, schedule),
                                                        MEDIATOR_SITE_2: MediatorConfig(8, 2, schedule)}
    _, sd = w.students[MEDIATOR_SITE]
    attn = model.a["attn1"]
    assert torch.equal(sd["qkv.weight"], torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert torch.equal(sd["proj.weight"], attn.to_out[0].weight) and not sd["dwc.weight"].any()
    match = match_sites(w, model_sites, sites)
    assert [s.name for s, _, _ in match.present] == [MEDIATOR_SITE, MEDIATOR_SITE_2] and not match.missing
    only_one = DeltaConvWeights.fresh_mediators(model_sites, model, sites=sites[1:])
    assert list(only_one.students) == [MEDIATOR_SITE_2]


def test_fresh_mediators_for_pixart():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    blocks = pytest.importorskip("comfy.ldm.pixart.blocks", reason="this ComfyUI has no PixArt")
    model.blocks[0].attn = blocks.AttentionKVCompress(16, num_heads=4, operations=comfy.ops.disable_weight_init)
    nn.init.normal_(model.blocks[0].attn.qkv.weight)
    nn.init.normal_(model.blocks[0].attn.qkv.bias)
    site = AttentionSite("blocks.0.attn", "transformer_blocks.0", 16, "dit", 0, 13)
    w = DeltaConvWeights.fresh_mediators(ModelSites("pixart", "PixArt-α (1 site)", (site,)), model)
    cfg, sd = w.students["transformer_blocks.0"]
    assert cfg.heads == 4 and torch.equal(sd["qkv.bias"], model.blocks[0].attn.qkv.bias)


def test_match_sites_checks_mediator_channels():
    w = mixed_weights()
    sites = (AttentionSite("x.attn1", MEDIATOR_SITE, 32, "down", 0, 7),)
    with pytest.raises(WeightFileError, match="expects 32 channels, the file has 16"):
        match_sites(w, ModelSites("sd1", "SD1.x UNet", sites), sites)
