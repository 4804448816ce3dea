"""In-process checks of what the end-to-end bad-input table cannot reach: quoting of hostile text, run numbers
reserved by concurrent runs, the rescue save after training, and damaged training state."""
import json
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from deltaconv_core.block import BlockConfig
from deltaconv_core.quoting import quoted
from deltaconv_core.students import build_student
from deltaconv_core.weights import WeightFileError, load_weights, read_training_state, save_weights

SITE = "down_blocks.0.attentions.0.transformer_blocks.0"
BLOCK = {"dim": 16, "kernel_size": 3, "scales": [1.0, 0.5], "gate": "scaled", "dw_bias": False}


@pytest.mark.parametrize("value,shown", [
    ("plain", "'plain'"),
    ("\x1b[31mred\x07", "'\\x1b[31mred\\x07'"),
    ("\u202eevil", "'\\u202eevil'"),  # right-to-left override: reorders a terminal line
])
def test_quoted_escapes_control_characters(value, shown):
    assert quoted(value) == shown


def test_quoted_cuts_and_survives_deep_nesting():
    assert len(quoted("x" * 10**6)) < 150 and "1000002 characters" in quoted("x" * 10**6)
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert quoted(deep) == "<list nested too deeply to show>"


class Unprintable:
    def __repr__(self):
        return "raw\x1b[2Jrepr"


def test_quoted_escapes_reprs_of_other_objects():
    assert quoted(Unprintable()) == "raw\\x1b[2Jrepr"


@pytest.mark.parametrize("name,suffix,problem", [
    ("é" * 120, 30, "is 270 bytes with the 30 bytes the node adds, over the file system's limit of 255"),
    ("é" * 128, 0, "is 256 bytes, over the file system's limit of 255"),
    ("/".join(["d" * 200] * 21), 0, "bytes per path"),
])
def test_output_path_refuses_names_too_long_in_bytes(validation, tmp_path, name, suffix, problem):
    with pytest.raises(ValueError, match="name = ") as err:
        validation.output_path(str(tmp_path), name, "name", suffix)
    assert problem in str(err.value) and len(str(err.value)) < 1000


def test_output_path_accepts_the_longest_name_that_fits(validation, tmp_path):
    path = validation.output_path(str(tmp_path), "é" * 112 + "a", "name", 30)  # 225 + 30 = 255 bytes
    open(path + "_00001_A_0000001.safetensors", "wb").close()


@pytest.fixture(scope="module")
def validation(pack):
    return pack.nodes.validation


def test_concurrent_runs_get_distinct_numbers(validation, tmp_path):
    """Eight runs reserving at once (as two servers sharing an output folder do): no two share a number."""
    prefix, barrier, got, release = str(tmp_path / "runs" / "p"), threading.Barrier(8), [], threading.Event()

    def run():
        barrier.wait()
        with validation.reserved_run(prefix) as run_prefix:
            got.append(run_prefix)
            release.wait(10)  # every run holds its number at the same time

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    while len(got) < 8 and any(t.is_alive() for t in threads):
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert sorted(os.path.basename(p) for p in got) == [f"p_{n:05d}" for n in range(1, 9)]
    assert os.listdir(tmp_path / "runs") == []  # markers removed when the runs end


def test_reservation_skips_finished_and_held_runs(validation, tmp_path):
    (tmp_path / "p_00001_A_0000005.safetensors").touch()  # a finished run
    (tmp_path / "p_00002_.reserved").touch()  # a run in progress elsewhere
    with validation.reserved_run(str(tmp_path / "p")) as run_prefix:
        assert os.path.basename(run_prefix) == "p_00003"
        assert (tmp_path / "p_00003_.reserved").exists()
    assert not (tmp_path / "p_00003_.reserved").exists()


def test_a_save_the_file_system_refuses_is_rescued_in_the_same_folder(pack, tmp_path, caplog):
    """The checkpoint name fails (here: too long for the file system); the blocks land under a short name."""
    weights = load_weights(block_file(tmp_path)[0])
    weights.training = {"step": 7, "config": {"stage": "A"}, "block_names": [SITE]}
    path = str(tmp_path / ("é" * 200 + ".safetensors"))
    saved = pack.nodes.distill_run.save_or_rescue(weights, path, {"rng": torch.Generator().get_state()})
    assert os.path.dirname(saved) == str(tmp_path) and os.path.basename(saved).startswith("deltaconv_rescued_A_0000007")
    assert read_training_state(saved)[1]["step"] == 7 and list(load_weights(saved).students) == [SITE]
    assert saved in caplog.text


def block_file(tmp_path, tensors=None, **meta):
    block = build_student(BlockConfig.from_dict(BLOCK)).state_dict()
    tensors = tensors or {f"{SITE}.conv1.{k}": v for k, v in block.items()}
    path = str(tmp_path / "f.safetensors")
    save_file(tensors, path, metadata={"deltaconv_format": "1", "family": "sd1", "blocks": json.dumps({SITE: BLOCK}),
                                       **meta})
    return path, tensors


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool, torch.float8_e5m2])
def test_non_float_block_tensors_are_refused(tmp_path, dtype):
    path, tensors = block_file(tmp_path)
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first].to(dtype)}, path, metadata={
        "deltaconv_format": "1", "family": "sd1", "blocks": json.dumps({SITE: BLOCK})})
    with pytest.raises(WeightFileError, match=f"tensor {first} has dtype {str(dtype)[6:]}"):
        load_weights(path)


def test_non_finite_block_tensors_name_the_first_bad_tensor(tmp_path):
    path, tensors = block_file(tmp_path)
    names = sorted(tensors)
    tensors[names[2]].view(-1)[1] = float("-inf")
    tensors[names[4]].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"deltaconv_format": "1", "family": "sd1", "blocks": json.dumps({SITE: BLOCK})})
    with pytest.raises(WeightFileError, match=f"tensor {names[2]} holds NaN or infinite values"):
        load_weights(path)


@pytest.mark.parametrize("training,tensors,problem", [
    ("[1]", {"rng": True}, "training info is list"),
    ('{"config": {"stage": "A"}, "block_names": []}', {"rng": True}, "no step count"),
    ('{"step": true, "config": {"stage": "A"}, "block_names": []}', {"rng": True}, "no step count"),
    ('{"step": 1, "config": ["A"], "block_names": []}', {"rng": True}, "no configuration with a stage"),
    ('{"step": 1, "config": {"stage": "A"}, "block_names": {}}', {"rng": True}, "no list of block names"),
    ('{"step": 1, "config": {"stage": "A"}, "block_names": [], "losses": 3}', {"rng": True}, "losses"),
    ('{"step": 1, "config": {"stage": "A"}, "block_names": []}', {"rng": False}, "random-number state"),
    ("[" * 100_000, {"rng": True}, "training is not valid JSON"),
])
def test_damaged_training_state_is_refused_naming_what_is_missing(tmp_path, training, tensors, problem):
    path, blocks = block_file(tmp_path)
    extra = {"_train.rng": torch.Generator().get_state()} if tensors["rng"] else {"_train.optim.x.step": torch.ones(())}
    save_file({**blocks, **extra}, path, metadata={"deltaconv_format": "1", "family": "sd1", "training": training,
                                                   "blocks": json.dumps({SITE: BLOCK})})
    with pytest.raises(WeightFileError, match=r"f\.safetensors: ") as err:
        read_training_state(path)
    assert problem in str(err.value) and len(str(err.value)) < 1000


def test_block_names_from_hostile_files_are_never_read(tmp_path):
    """Tensor names with escapes or megabytes before `transformer_blocks` are not block names: ignored."""
    path, tensors = block_file(tmp_path)
    hostile = {f"\x1b[2J{k}": v.clone() for k, v in tensors.items()} | {"x" * 300 + "." + k: v.clone()
                                                                       for k, v in tensors.items()}
    save_file({**tensors, **hostile}, path, metadata={"deltaconv_format": "1", "family": "sd1",
                                                       "blocks": json.dumps({SITE: BLOCK})})
    weights = load_weights(path)
    assert list(weights.students) == [SITE] and weights.ignored_tensors == len(hostile)


def test_round_trip_still_works(tmp_path):
    path, _ = block_file(tmp_path)
    weights = load_weights(path)
    assert save_weights(weights, str(tmp_path / "copy"))
