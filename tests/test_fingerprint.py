"""Base-model fingerprints: one definition for Distill and Patch, blind to the load dtype and to missing blocks."""
import pytest
import torch

from deltaconv_core.families import find_attention_sites
from deltaconv_core.fingerprint import mismatched_sites, same_base, site_fingerprint
from deltaconv_core.weights import DeltaConvWeights, WeightFileError, load_weights, save_weights

FP8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, *FP8]
MISMATCH = "distilled from a different checkpoint"


def weight(seed, std=0.03):
    return torch.randn(320, 320, generator=torch.Generator().manual_seed(seed)) * std


@pytest.mark.parametrize("std", [0.01, 0.05])
@pytest.mark.parametrize("taken_in", DTYPES, ids=str)
def test_same_weight_matches_in_every_load_dtype(taken_in, std):
    w = weight(0, std)
    fingerprint = site_fingerprint(w.to(taken_in))
    assert all(same_base(fingerprint, w.to(dtype)) for dtype in DTYPES)
    assert same_base(fingerprint, (w * 7.5).to(taken_in))  # scaled-fp8 files store weight / scale
    assert not same_base(fingerprint, weight(1, std))  # another model


def test_changed_weights_and_damaged_fingerprints():
    w = weight(0)
    fingerprint = site_fingerprint(w)
    assert not same_base(fingerprint, w + 0.1 * weight(2))  # a fine-tune that moved the weights by 10 %
    assert same_base(fingerprint[:-4] + "AAA=", w) is None and same_base("float32:???", w) is None
    assert site_fingerprint(torch.zeros(8, 8)) is None


def test_only_sites_both_sides_have_are_compared():
    a, b, c = weight(0), weight(1), weight(2)
    stored = {"s0": site_fingerprint(a), "s1": site_fingerprint(b)}
    assert mismatched_sites(stored, {"s1": b.half(), "s2": c}) == ([], 1)
    assert mismatched_sites(stored, {"s0": c, "s1": b}) == (["s0"], 2)


def test_fingerprints_round_trip_and_old_files_still_load(tmp_path):
    from test_weights import own_weights

    w = own_weights()
    w.site_fingerprints = {name: site_fingerprint(weight(i)) for i, name in enumerate(w.students)}
    back = load_weights(save_weights(w, str(tmp_path / "new.safetensors")))
    assert back.site_fingerprints == w.site_fingerprints and back.base_fingerprint == w.base_fingerprint
    w.site_fingerprints = {}  # a file from before per-site fingerprints: its single hash is kept, not compared
    assert load_weights(save_weights(w, str(tmp_path / "old.safetensors"))).site_fingerprints == {}
    w.site_fingerprints = {"x": 3}
    with pytest.raises(WeightFileError, match="site_fingerprints"):
        load_weights(save_weights(w, str(tmp_path / "bad.safetensors")))


def test_patch_notes_another_checkpoint_but_not_another_dtype_or_missing_blocks(pack, load_tiny):
    model = load_tiny("tiny_sd15")
    sites = find_attention_sites(model.model.diffusion_model)
    weights = DeltaConvWeights.fresh(sites, 0)
    weights.site_fingerprints = pack.nodes.distill_run.model_fingerprints(model, sites)  # what Distill stores
    del weights.students[sites.sites[0].name]  # a file without the first block

    as_fp16 = load_tiny("tiny_sd15")
    as_fp16.model.diffusion_model.half()
    _, report, _ = pack.nodes.patching.patch_model(as_fp16, weights)
    assert MISMATCH not in report, report

    other = load_tiny("tiny_sd15")
    with torch.no_grad():
        for site in sites.sites:
            q = other.model.diffusion_model.get_submodule(site.path).to_q.weight
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(9)) * q.std())
    _, report, _ = pack.nodes.patching.patch_model(other, weights)
    assert MISMATCH in report and f"{len(sites.sites) - 1} of {len(sites.sites) - 1} sites differ" in report
