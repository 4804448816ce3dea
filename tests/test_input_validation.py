"""Input checks without a server: kernel presets, the output-path guard, weight-file metadata types and .sft files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from deltaconv_core.block import MAX_KERNEL_SIZE, BlockConfig
from deltaconv_core.families import AttentionSite
from deltaconv_core.students import build_student
from deltaconv_core.weights import DeltaConvWeights, WeightFileError, load_weights, save_weights

SITE = "down_blocks.0.attentions.0.transformer_blocks.0"
GOOD_BLOCK = {"dim": 16, "kernel_size": 3, "scales": [1.0, 0.5], "gate": "scaled", "dw_bias": False}


@pytest.fixture(scope="module")
def validation(pack):
    return pack.nodes.validation


@pytest.mark.parametrize("text,expected", [
    ("", None), ("  ", None), ("9", 9), (" 9 ", 9), ("9.0", 9), ("1", 1), (str(MAX_KERNEL_SIZE), MAX_KERNEL_SIZE),
    ('{"a": 7, "b": 13.0}', {"a": 7, "b": 13}), ("{}", {}),
])
def test_kernel_preset_accepted(validation, text, expected):
    assert validation.read_kernel_preset(text) == expected
    assert validation.kernel_preset_error(text) is True


@pytest.mark.parametrize("text,problem", [
    ("true", "true is not an odd whole number"),  # JSON true must not become kernel size 1
    ("false", "false is not an odd whole number"),
    ("null", "null is not an odd whole number"),
    ("None", "neither a number nor JSON"),  # what ComfyUI makes of a JSON null widget value
    ("x", "neither a number nor JSON"),
    ("9,7", "neither a number nor JSON"),
    ("8", "8 is not an odd"), ("0", "0 is not an odd"), ("-3", "-3 is not an odd"), ("9.5", "9.5 is not an odd"),
    ("99999", "99999 is not an odd"), ("1e400", "Infinity is not an odd"),
    ('"9"', '"9" is not an odd'), ("[7]", "[7] is not an odd"),
    ('{"a": true}', "block a: true"), ('{"a": "7"}', 'block a: "7"'), ('{"a": 19}', "block a: 19"),
    ("[" * 100_000, "neither a number nor JSON"),
])
def test_kernel_preset_refused_with_the_value_and_what_is_allowed(validation, text, problem):
    message = validation.kernel_preset_error(text)
    assert message is not True and message.startswith("kernel_preset = ") and problem in message
    assert f"from 1 to {MAX_KERNEL_SIZE}" in message and len(message) < 600
    with pytest.raises(ValueError, match="kernel_preset"):
        validation.read_kernel_preset(text)


def test_kernel_preset_names_must_exist(validation):
    sites = [AttentionSite("p", name, 320, "down", 0, 7) for name in ("a", "b")]
    assert validation.parse_kernel_preset("5", sites) == {"a": 5, "b": 5}
    assert validation.parse_kernel_preset('{"b": 3}', sites) == {"b": 3}
    assert validation.parse_kernel_preset("", sites) == {}
    with pytest.raises(ValueError, match=r"kernel_preset names 1 block\(s\) this model does not have.*'c'"):
        validation.parse_kernel_preset('{"a": 3, "c": 5}', sites)


@pytest.mark.parametrize("name", ["x", "runs/x", "runs\\x", "my deltaconv-v1.2", " padded "])
def test_output_path_allows_names_and_subfolders(validation, tmp_path, name):
    path = validation.output_path(str(tmp_path), name, "filename")
    assert os.path.dirname(path).startswith(str(tmp_path)) and path.endswith(name.strip()[-1])


@pytest.mark.parametrize("name,problem", [
    ("", "is empty"), ("   ", "is empty"), (None, "is empty"),
    ("../x", "'..' leads out"), ("a/../../x", "'..' leads out"), ("..\\x", "'..' leads out"),
    ("/tmp/x", "absolute path"), ("\\x", "absolute path"),
    (".hidden", "hidden name"), ("a/./b", "hidden name or '.'"),
    ("a:b", "characters that are not allowed"), ("x\x00y", "characters that are not allowed"),
    ("x" * 300, "longer than 200"),
])
def test_output_path_refuses_escapes(validation, tmp_path, name, problem):
    with pytest.raises(ValueError, match="filename = ") as err:
        validation.output_path(str(tmp_path), name, "filename")
    assert problem in str(err.value) and "inside" in str(err.value)


def test_output_path_refuses_symlinked_subfolder(validation, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "folder" / "link")
    with pytest.raises(ValueError, match=r"leads outside .* through a symbolic link"):
        validation.output_path(str(tmp_path / "folder"), "link/x", "filename_prefix")
    # a folder that is itself a link is the user's choice: writes into it are fine
    os.symlink(tmp_path / "elsewhere", tmp_path / "linked_folder")
    assert validation.output_path(str(tmp_path / "linked_folder"), "x", "filename").endswith("x")


def block_file(tmp_path, entry, family="sd1", training="{}"):
    tensors = {f"{SITE}.conv1.{k}": v for k, v in build_student(BlockConfig(**{**GOOD_BLOCK, "scales": (1.0, 0.5)}))
               .state_dict().items()}
    path = str(tmp_path / "meta.safetensors")
    save_file(tensors, path, metadata={"deltaconv_format": "1", "family": family, "training": training,
                                       "blocks": json.dumps({SITE: entry})})
    return path


@pytest.mark.parametrize("change,problem", [
    ({"dim": 16.0}, "dim must be an integer, got 16.0"),
    ({"kernel_size": 3.0}, "kernel_size must be an integer, got 3.0"),
    ({"kernel_size": "3"}, "kernel_size must be an integer, got '3'"),
    ({"kernel_size": True}, "kernel_size must be an integer, got True"),
    ({"kernel_size": 19}, f"kernel_size must be an odd number from 1 to {MAX_KERNEL_SIZE}, got 19"),
    ({"dim": 0}, "channel count divisible by 4, got 0"),
    ({"dw_bias": "no"}, "dw_bias must be true or false"),
    ({"scales": ["1", "0.5"]}, "scales must be a list of numbers"),
    ({"scales": 1.0}, "not iterable"),
    ({"gate": ["scaled"]}, "gate must be one of"),
    ({"padding": 1}, "unknown block setting(s) ['padding']"),
    ({"x" * 10**6: 1}, "unknown block setting(s) ['xxx"),
    ({"gate": "\x1b[2J" * 10**5}, "got '\\x1b[2J"),
])
def test_block_metadata_types_fail_at_load(tmp_path, change, problem):
    with pytest.raises(WeightFileError, match=f"damaged ΔConv metadata for block '{SITE}'") as err:
        load_weights(block_file(tmp_path, {**GOOD_BLOCK, **change}))
    assert problem in str(err.value) and len(str(err.value)) < 1000 and "\x1b" not in str(err.value)


@pytest.mark.parametrize("meta,problem", [
    ({"family": "sd3"}, "family = 'sd3' is not one of sd1, sd2, sdxl, pixart"),
    ({"training": "[1]"}, "training is list, not a mapping"),
])
def test_file_metadata_types_fail_at_load(tmp_path, meta, problem):
    with pytest.raises(WeightFileError, match="damaged ΔConv metadata") as err:
        load_weights(block_file(tmp_path, GOOD_BLOCK, **meta))
    assert problem in str(err.value)


def test_sft_files_load_and_save(tmp_path):
    weights = DeltaConvWeights("sd1", {SITE: (BlockConfig(16, 3), build_student(BlockConfig(16, 3)).state_dict())})
    path = save_weights(weights, str(tmp_path / "blocks.sft"))
    assert path.endswith("blocks.sft")
    loaded = load_weights(path)
    assert torch.equal(loaded.students[SITE][1]["conv_up.weight"], weights.students[SITE][1]["conv_up.weight"])


def test_sft_listed_in_the_deltaconv_folder(pack):
    import folder_paths

    assert ".sft" in folder_paths.folder_names_and_paths[pack.nodes.folders.FOLDER][1]
