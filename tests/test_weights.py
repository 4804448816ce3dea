"""Weight files (deltaconv_core/weights.py): official ConvFusion layouts (docs/design.md) and our own format."""
import builtins
import os
import pathlib
import pickle
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

import deltaconv_core.weights as weights_mod
from deltaconv_core.block import BlockConfig
from deltaconv_core.families import AttentionSite, ModelSites
from deltaconv_core.students import build_student
from deltaconv_core.weights import (
    DeltaConvWeights,
    WeightFileError,
    load_weights,
    match_sites,
    save_weights,
)

# ------------------------------------------------------- official layouts, written out here (not from weights.py)
# (block name, C, k). SD1.5: 16 blocks, one transformer block per attention.
SD1_LAYOUT = (
    [(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0", c, k)
     for b, c, k in ((0, 320, 7), (1, 640, 9), (2, 1280, 5)) for a in range(2)]
    + [("mid_block.attentions.0.transformer_blocks.0", 1280, 3)]
    + [(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0", c, k)
       for b, c, k in ((1, 1280, 5), (2, 640, 9), (3, 320, 11)) for a in range(3)])
# SDXL: transformer_layers_per_block [1, 2, 10] → 2 / 10 transformer blocks per attention; 70 blocks.
SDXL_LAYOUT = (
    [(f"down_blocks.1.attentions.{a}.transformer_blocks.{t}", 640, 9) for a in range(2) for t in range(2)]
    + [(f"down_blocks.2.attentions.{a}.transformer_blocks.{t}", 1280, 7) for a in range(2) for t in range(10)]
    + [(f"mid_block.attentions.0.transformer_blocks.{t}", 1280, 9) for t in range(10)]
    + [(f"up_blocks.0.attentions.{a}.transformer_blocks.{t}", 1280, 9) for a in range(3) for t in range(10)]
    + [(f"up_blocks.1.attentions.{a}.transformer_blocks.{t}", 640, 13) for a in range(3) for t in range(2)])
PIXART_LAYOUT = [(f"transformer_blocks.{i}", 1152, 13) for i in range(28)]

# Student-UNet tensors that official SD files also carry. The resnet keys contain ".conv1." but are NOT ΔConv
# blocks; a loader matching on ".conv1." alone would take `down_blocks.0.resnets.0` for a block.
SD_EXTRAS = ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
             "down_blocks.0.resnets.0.conv1.bias", "down_blocks.1.resnets.1.conv1.weight",
             "mid_block.resnets.0.conv1.weight", "up_blocks.3.resnets.2.conv1.weight",
             "down_blocks.1.attentions.0.proj_in.weight",
             "down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight",
             "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj.weight"]

# family key → (layout, n scales, inferred family, gate, extra keys, parameter totals without / with dw bias)
FAMILIES = {
    "sd1": (SD1_LAYOUT, 2, "sd1", "scaled", SD_EXTRAS, (25_390_240, 25_402_720)),
    "sdxl": (SDXL_LAYOUT, 2, "sdxl", "scaled", SD_EXTRAS + ["add_embedding.linear_1.weight"],
             (211_265_920, 211_349_120)),
    "pixart-2sc": (PIXART_LAYOUT, 2, "pixart", "sigmoid", [], (79_849_728, 79_881_984)),
    "pixart-3sc": (PIXART_LAYOUT, 3, "pixart", "sigmoid", [], (91_865_088, 91_913_472)),
}
SCALES = {1: (1.0,), 2: (1.0, 0.5), 3: (1.0, 0.5, 1 / 3)}


def official_block(prefix, c, k, n, dw_bias, make):
    """Tensors of one block under the official keys (written out here, not from weights.py)."""
    shapes = {"conv_up.weight": (c // 2, c), "conv_up.bias": (c // 2,),
              "conv_out.weight": (c, n * c // 4), "conv_out.bias": (c,),
              "conv_pool.weight": (c, c), "conv_pool.bias": (c,)}
    for i in range(n):
        shapes[f"gates.{i}.conv_spatial.weight"] = (k, k, c // 2)
        if dw_bias:
            shapes[f"gates.{i}.conv_spatial.bias"] = (c // 2,)
    return {f"{prefix}.conv1.{name}": make(shape) for name, shape in shapes.items()}


def fp16_random(gen):
    return lambda shape: torch.randn(shape, generator=gen).to(torch.float16)


def fp16_zeros(shape):
    return torch.zeros(shape, dtype=torch.float16)


@pytest.fixture(scope="module")
def tensor_cache():
    """Keeps one family's tensors between its with/without-bias cases (SDXL alone is ~420 MB of fp16)."""
    cache = {}
    yield cache
    cache.clear()


def family_tensors(cache, family, dw_bias):
    layout, n, *_ = FAMILIES[family]
    if family not in cache:
        cache.clear()  # drop the previous family's tensors first
        # real shapes everywhere; random values where cheap (SD1.5), zeros for the big ones (fast to allocate)
        make = fp16_random(torch.Generator().manual_seed(0)) if family == "sd1" else fp16_zeros
        cache[family] = {key: t for name, c, k in layout
                         for key, t in official_block(name, c, k, n, False, make).items()}
    tensors = dict(cache[family])
    if dw_bias:
        gen = torch.Generator().manual_seed(1)
        for name, c, _ in layout:
            for i in range(n):
                tensors[f"{name}.conv1.gates.{i}.conv_spatial.bias"] = torch.randn(c // 2, generator=gen).half()
    return tensors


@pytest.mark.parametrize("dw_bias", [False, True], ids=["nobias", "dwbias"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_official_file_loads(tmp_path, tensor_cache, family, dw_bias):
    layout, n, expected_family, gate, extras, totals = FAMILIES[family]
    tensors = family_tensors(tensor_cache, family, dw_bias)
    tensors.update({key: torch.ones(4, dtype=torch.float16) for key in extras})
    path = str(tmp_path / f"ConvFusion-{family}.safetensors")
    save_file(tensors, path)
    try:
        w = load_weights(path)
    finally:
        os.remove(path)  # tensors are already in memory (or mapped); do not leave 400 MB in tmp

    assert w.family == expected_family
    assert w.format == "official ConvFusion" and w.base_fingerprint is None and w.training == {}
    assert len(w.students) == len(layout) == {"sd1": 16, "sdxl": 70, "pixart": 28}[expected_family]
    assert set(w.students) == {name for name, _, _ in layout}  # no resnet "block" among them
    assert w.ignored_tensors == len(extras)
    total = 0
    for name, c, k in layout:
        cfg, sd = w.students[name]
        assert cfg == BlockConfig(dim=c, kernel_size=k, scales=SCALES[n], gate=gate, dw_bias=dw_bias), name
        for key, t in sd.items():
            assert tuple(t.shape) == tuple(tensors[f"{name}.conv1.{key}"].shape), (name, key)
        total += sum(t.numel() for t in sd.values())
        # strict load (nothing missing/unexpected, every shape right); meta device: no 800 MB of copies
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op"
            build_student(cfg, sd, device="meta")
    assert total == totals[dw_bias]  # per-model parameter totals of the block formula (test_block.py)

    # values survive: real (not meta) loads of the first and last block, compared bit for bit
    for name, _, _ in (layout[0], layout[-1]):
        cfg, sd = w.students[name]
        block = build_student(cfg, sd, dtype=torch.float16)
        for key, t in block.state_dict().items():
            assert torch.equal(t, tensors[f"{name}.conv1.{key}"]), (name, key)
    if family == "sd1":  # the random values are not all equal, so the comparison above means something
        assert tensors[f"{layout[0][0]}.conv1.conv_pool.weight"].std() > 0.5


# --------------------------------------------------------------------------------- matching to a model
def sd1_sites(change=None):
    """Sites as families.find_attention_sites would describe an SD1 UNet; `change` = (name, channels)."""
    sites = []
    for i, (name, c, k) in enumerate(SD1_LAYOUT):
        direction = name.split("_")[0] if not name.startswith("mid") else "mid"
        if change and name == change[0]:
            c = change[1]
        sites.append(AttentionSite(f"site{i}.attn1", name, c, direction, 0, k))
    return tuple(sites)


@pytest.fixture(scope="module")
def sd1_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd1") / "sd1.safetensors")
    tensors = {key: t for name, c, k in SD1_LAYOUT
               for key, t in official_block(name, c, k, 2, False, fp16_zeros).items()}
    save_file(tensors, path)
    return load_weights(path)


def test_match_sites_pairs_every_block(sd1_weights):
    sites = sd1_sites()
    match = match_sites(sd1_weights, ModelSites("sd1", "SD1.x UNet (16 sites)", sites), sites)
    assert [s.name for s, _, _ in match.present] == [name for name, _, _ in SD1_LAYOUT]
    assert all(cfg.dim == s.channels and sd is sd1_weights.students[s.name][1] for s, cfg, sd in match.present)
    assert match.missing == [] and match.unused == []
    # a selection covers only its sites; a model site absent from the file is reported missing
    extra = AttentionSite("x.attn1", "down_blocks.0.attentions.0.transformer_blocks.1", 320, "down", 0, 7)
    model = ModelSites("sd1", "SD1.x UNet", sites[1:] + (extra,))
    match = match_sites(sd1_weights, model, [sites[3], extra])
    assert [s.name for s, _, _ in match.present] == [sites[3].name]
    assert match.missing == [extra]
    assert match.unused == [sites[0].name]  # in the file, not in this model


@pytest.mark.parametrize("family,variant", [("sdxl", "SDXL UNet (70 self-attention sites)"),
                                            ("pixart", "PixArt-Σ (28 self-attention sites)"),
                                            ("sd2", "SD2.x UNet (16 self-attention sites)")])
def test_wrong_family_refused(sd1_weights, family, variant):
    sites = sd1_sites()  # even with matching names, another family must be refused
    with pytest.raises(WeightFileError) as err:
        match_sites(sd1_weights, ModelSites(family, variant, sites), sites)
    msg = str(err.value)
    assert "SD1.x" in msg and variant in msg
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in msg


@pytest.mark.parametrize("name,channels", [("up_blocks.2.attentions.1.transformer_blocks.0", 1280),
                                           ("down_blocks.0.attentions.0.transformer_blocks.0", 640)])
def test_channel_mismatch_refused(sd1_weights, name, channels):
    found = dict((n, c) for n, c, _ in SD1_LAYOUT)[name]
    sites = sd1_sites(change=(name, channels))
    with pytest.raises(WeightFileError) as err:
        match_sites(sd1_weights, ModelSites("sd1", "SD1.x UNet", sites), sites)
    msg = str(err.value)
    assert name in msg and f"{channels} channels" in msg and re.search(rf"\b{found}\b", msg)  # expected, found


# ------------------------------------------------------------------------------------ malformed blocks
def small_official(tmp_path, mutate=None, c=16, k=3, n=2, dw_bias=False):
    """A one-block PixArt-named official file, optionally with some tensors replaced (shape → zeros)."""
    tensors = official_block("transformer_blocks.0", c, k, n, dw_bias, torch.randn)
    for key, shape in (mutate or {}).items():
        if shape is None:
            tensors.pop(f"transformer_blocks.0.conv1.{key}")
        else:
            tensors[f"transformer_blocks.0.conv1.{key}"] = torch.zeros(shape)
    path = str(tmp_path / "block.safetensors")
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("key,found,expected", [
    ("conv_out.weight", (16, 10), (16, 8)),  # conv_out of the wrong width
    ("gates.1.conv_spatial.weight", (5, 5, 8), (3, 3, 8)),  # gates with different kernel sizes
    ("gates.1.conv_spatial.weight", (3, 3, 6), (3, 3, 8)),
    ("conv_up.weight", (8, 12), (8, 16)),
    ("conv_pool.weight", (16, 12), (16, 16)),
    ("conv_pool.bias", (15,), (16,)),
])
def test_wrong_shape_refused(tmp_path, key, found, expected):
    with pytest.raises(WeightFileError) as err:
        load_weights(small_official(tmp_path, {key: found}))
    msg = str(err.value)
    assert f"transformer_blocks.0.conv1.{key}" in msg
    assert str(list(found)) in msg and str(list(expected)) in msg


@pytest.mark.parametrize("mutate,word", [({"conv_out.bias": None}, "missing"),
                                         ({"gates.1.conv_spatial.bias": (8,)}, "unexpected"),
                                         ({"gates.0.conv_spatial.bias": (8,)}, "missing")])
def test_missing_or_unexpected_tensor_refused(tmp_path, mutate, word):
    with pytest.raises(WeightFileError, match=word):
        load_weights(small_official(tmp_path, mutate))


@pytest.mark.parametrize("kwargs", [dict(k=4), dict(c=18), dict(mutate={"conv_pool.weight": ()})],
                         ids=["even-kernel", "dim-not-multiple-of-4", "0d-conv_pool"])
def test_impossible_config_is_weight_file_error(tmp_path, kwargs):
    with pytest.raises(WeightFileError, match=re.escape("transformer_blocks.0")):
        load_weights(small_official(tmp_path, **kwargs))


# --------------------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize("name", ["x.ckpt", "x.pt", "x.bin", "x.pth", "x.pkl", "X.CKPT"])
def test_pickle_files_refused_unopened(tmp_path, monkeypatch, name):
    path = tmp_path / name
    payload = b"\x80\x04garbage that must never be unpickled" + os.urandom(64)
    path.write_bytes(payload)

    calls = []

    class Opened(BaseException):  # not an Exception: a loader's `except Exception` cannot swallow it
        pass

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise Opened(args)

    with monkeypatch.context() as m:  # any attempt to open or unpickle fails the test
        for target, attr in ((weights_mod, "safe_open"), (builtins, "open"), (torch, "load"), (pickle, "load"),
                             (os, "open")):
            m.setattr(target, attr, forbidden)
        with pytest.raises(WeightFileError) as err:
            load_weights(str(path))
    assert calls == []
    msg = str(err.value).lower()
    assert "pickle" in msg and "safetensors" in msg and name.lower() in msg
    assert path.read_bytes() == payload


def test_unreadable_safetensors_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"transformer_blocks.0.conv1.conv_up.bias": torch.zeros(1000)}, str(good))
    data = good.read_bytes()
    cases = {"garbage": os.urandom(4096), "empty": b"", "truncated-header": data[:20],
             "truncated-data": data[:-500], "trailing-bytes": data + b"\0" * 16}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(WeightFileError, match=name):  # not a raw safetensors exception, names the file
            load_weights(str(path))
    with pytest.raises(WeightFileError):
        load_weights(str(tmp_path / "model.gguf"))


def test_file_without_deltaconv_blocks_refused(tmp_path):
    path = str(tmp_path / "unet.safetensors")
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3),
               "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),  # ".conv1." but a resnet
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(WeightFileError, match="no ΔConv blocks"):
        load_weights(path)


# ------------------------------------------------------------------------------------------ our format
def own_weights(seed=0):
    """Non-official configs under SD1 names (gate, kernels, dims differ from what inference would give), so
    the round trip must come from the metadata; mixed dtypes must survive bit-exactly."""
    gen = torch.Generator().manual_seed(seed)
    configs = {
        "down_blocks.0.attentions.0.transformer_blocks.0": (BlockConfig(16, 5, (1.0, 0.5), "sigmoid"), torch.float32),
        "mid_block.attentions.0.transformer_blocks.0": (BlockConfig(24, 3, (1.0, 0.5, 1 / 3), "scaled", True),
                                                       torch.bfloat16),
        "up_blocks.3.attentions.2.transformer_blocks.0": (BlockConfig(8, 1, (1.0,), "scaled"), torch.float16),
    }
    blocks = {}
    for name, (cfg, dtype) in configs.items():
        sd = build_student(cfg, device="meta").state_dict()
        blocks[name] = (cfg, {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in sd.items()})
    return DeltaConvWeights("sd1", blocks, base_fingerprint="0123456789abcdef",
                            training={"steps": 750, "lr": 3e-4, "levels": "finest two", "sites": [1, 2]})


def temp_files(folder):
    return [f for f in os.listdir(folder) if f.startswith(".deltaconv-") and f.endswith(".tmp")]


def test_save_load_round_trip(tmp_path):
    w = own_weights()
    path = save_weights(w, str(tmp_path / "mine"))
    assert path == str(tmp_path / "mine.safetensors") and os.path.isfile(path)
    back = load_weights(path)
    assert back.family == "sd1" and back.format.startswith("deltaconv")
    assert back.base_fingerprint == "0123456789abcdef"
    assert back.training == w.training
    assert list(back.students) == list(w.students)
    for name, (cfg, sd) in w.students.items():
        cfg2, sd2 = back.students[name]
        assert cfg2 == cfg
        assert set(sd2) == set(sd)
        for key in sd:
            assert sd2[key].dtype == sd[key].dtype and torch.equal(sd2[key], sd[key]), (name, key)
        build_student(cfg2, sd2)  # strict
    assert temp_files(tmp_path) == []
    # no fingerprint stays None (not "")
    w.base_fingerprint = None
    assert load_weights(save_weights(w, str(tmp_path / "nofp.safetensors"))).base_fingerprint is None


def test_save_refuses_overwrite(tmp_path):
    path = save_weights(own_weights(0), str(tmp_path / "w.safetensors"))
    before = pathlib.Path(path).read_bytes()
    with pytest.raises(FileExistsError):
        save_weights(own_weights(1), path)
    assert pathlib.Path(path).read_bytes() == before
    save_weights(own_weights(1), path, overwrite=True)
    name = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert torch.equal(load_weights(path).students[name][1]["conv_up.weight"],
                       own_weights(1).students[name][1]["conv_up.weight"])
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    path = str(tmp_path / "w.safetensors")
    if existing:
        save_weights(own_weights(0), path)
        before = pathlib.Path(path).read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half-written temp file, then the disk "fills up"
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(weights_mod, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space"):
        save_weights(own_weights(1), path, overwrite=True)
    assert temp_files(tmp_path) == []
    if existing:
        assert pathlib.Path(path).read_bytes() == before  # the old file is untouched
    else:
        assert not os.path.exists(path)


@pytest.mark.parametrize("meta", [{"deltaconv_format": "1", "blocks": "{}"},  # no family
                                  {"deltaconv_format": "1", "family": "sd1", "blocks": "{not json"},
                                  {"deltaconv_format": "1", "family": "sd1", "blocks": '{"x": {"dim": 8, "k": 3}}'}])
def test_damaged_own_metadata_is_weight_file_error(tmp_path, meta):
    path = str(tmp_path / "damaged.safetensors")
    save_file({"transformer_blocks.0.conv1.conv_up.bias": torch.zeros(4)}, path, metadata=meta)
    with pytest.raises(WeightFileError, match="damaged ΔConv metadata"):
        load_weights(path)


def test_fresh_blocks_leave_the_global_random_state_alone():
    """Fresh blocks come from their seed alone and leave torch's global generator (ComfyUI's) where it was."""
    sites = ModelSites("sd1", "tiny", (AttentionSite("a", "down_blocks.0.attentions.0.transformer_blocks.0", 16,
                                                     "down", 0, 3),))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = DeltaConvWeights.fresh(sites, seed=5)
    assert torch.equal(torch.rand(4), expected)  # the global stream continues as if nothing had drawn from it
    second = DeltaConvWeights.fresh(sites, seed=5)
    other = DeltaConvWeights.fresh(sites, seed=6)
    name = sites.sites[0].name
    assert all(torch.equal(v, second.students[name][1][k]) for k, v in first.students[name][1].items())
    assert not torch.equal(first.students[name][1]["conv_up.weight"], other.students[name][1]["conv_up.weight"])
