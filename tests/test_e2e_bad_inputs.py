"""Bad values for the inputs of every ΔConv node, each queued through POST /prompt on the running server.

Each case must be refused with a clear error (at validation, or when the node runs, with our message), the server
must keep serving, the next good prompt must give the result a fresh run gives, bit for bit, and no file may be
left behind; every message stays short and holds no raw control character, whatever the input or file holds.
Graphs are the tiny SD1.5 model's and run one step; cases refused at validation run nothing.
"""
import copy
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import pytest
import torch
from graphs import txt2img
from safetensors.torch import save_file

from devkit.comfy_server import ComfyError

NAN, MISSING = float("nan"), object()
COND = {"tokens": 16, "dim": 768, "pooled_dim": 0}
WEIGHTS = "tiny_sd15_random.safetensors"
BAD_FILES = ("corrupt", "truncated", "pickle", "no_blocks", "float_dim", "nan", "inf", "int8", "int64", "bool",
             "fp8", "nested_blocks", "huge_family", "huge_setting", "huge_format", "escape_names",
             "nested_training", "nested_fingerprints", "list_training", "resume_no_step", "resume_config_text",
             "resume_no_rng", "resume_names_text")
MAX_MESSAGE = 1000  # characters of any one message: ours take a few hundred, whatever the input holds
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested far past Python's recursion limit


@dataclass
class Via:
    """A bad input that is another node's output: `nodes` are added to the graph, the input linked to `output`."""
    nodes: dict
    output: list


def common(unet_inputs):
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **COND}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 2, **COND}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def base_graphs(unet_inputs):
    """One small working graph per ΔConv node; each case changes one input of the node under test."""
    load_patch = txt2img("sd15", WEIGHTS, steps=1, start=0.2, unet_inputs=unet_inputs)
    load = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": WEIGHTS}}
    patch = {"class_type": "DeltaConvPatch", "inputs": {"model": ["unet", 0], "deltaconv": ["load", 0],
                                                        "start_percent": 0.0, "end_percent": 1.0, "levels": "all",
                                                        "strict": False}}
    sampling = {"seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}
    return {
        "DeltaConvLoad": (load_patch, "load"),
        "DeltaConvPatch": (load_patch, "patch"),
        "DeltaConvSave": ({"load": load, "save": {"class_type": "DeltaConvSave", "inputs": {
            "deltaconv": ["load", 0], "filename": "bad_inputs_good", "overwrite": False}}}, "save"),
        "DeltaConvAttentionLocality": ({**common(unet_inputs), "locality": {
            "class_type": "DeltaConvAttentionLocality", "inputs": {
                "model": ["unet", 0], "positive": ["pos", 0], "width": 64, "height": 64, "sigma": 1.0, "seed": 0,
                "max_queries": 4}}}, "locality"),
        "DeltaConvCompare": ({**common(unet_inputs), "load": load, "patch": patch,
                              "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
                              "compare": {"class_type": "DeltaConvCompare", "inputs": {
                                  "model": ["unet", 0], "patched_model": ["patch", 0], "vae": ["vae", 0],
                                  **sampling}}}, "compare"),
        "DeltaConvDistill": ({**common(unet_inputs), "distill": {"class_type": "DeltaConvDistill", "inputs": {
            "model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "stage": "A",
            "steps": 1, "learning_rate": 1e-3, "batch_size": 1, "seed": 0, "save_every": 0,
            "filename_prefix": "bad_inputs_good", "warmup_steps": 0, "training_dtype": "fp32", "allow_cpu": True}},
            "show": {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["distill", 2]}}}, "distill"),
    }


def loaded(name: str) -> Via:
    return Via({"bad_load": {"class_type": "DeltaConvLoad", "inputs": {"weights_name": name}}}, ["bad_load", 0])


def cases(outside, unet_inputs):
    """(node, input, value, what the error must say): bad types, ranges, empties, huge values, bad files, escapes."""
    huge, mega = "x" * 100_000, "x" * 1_000_000
    deep_path = "/".join(["d" * 200] * 21)  # each name allowed, the whole path beyond PATH_MAX (4096 bytes)
    too_long = "over the file system's limit of"
    sdxl = Via({"unet_xl": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sdxl.safetensors",
                                                                   **unet_inputs}}}, ["unet_xl", 0])
    escapes = [("../escaped", "'..' leads out"), ("sub/../../escaped", "'..' leads out"),
               (os.path.join(outside, "escaped"), "absolute path"), ("bad_inputs_link/escaped", "symbolic link"),
               ("", "is empty"), ("   ", "is empty"), (".hidden", "hidden name"), (huge, "longer than 200")]
    table = [
        ("DeltaConvLoad", "weights_name", "missing.safetensors", "weights_name"),
        ("DeltaConvLoad", "weights_name", "", "weights_name"),
        ("DeltaConvLoad", "weights_name", 7, "weights_name"),
        ("DeltaConvLoad", "weights_name", MISSING, "weights_name"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_corrupt.safetensors", "not a readable safetensors file"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_truncated.safetensors", "not a readable safetensors file"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_pickle.safetensors", "not a readable safetensors file"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_pickle.pt", "pickle-based file"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_no_blocks.safetensors", "holds no ΔConv blocks"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_float_dim.safetensors", "dim must be an integer, got 320.0"),
        ("DeltaConvLoad", "weights_name", "tiny_sdxl_random.safetensors", "was made for SDXL"),  # wrong family
        ("DeltaConvPatch", "start_percent", NAN, "start_percent = nan"),
        ("DeltaConvPatch", "start_percent", -0.5, "start_percent"),
        ("DeltaConvPatch", "end_percent", 1e308, "end_percent"),
        ("DeltaConvPatch", "end_percent", "half", "end_percent"),
        ("DeltaConvPatch", "end_percent", 0.1, "start_percent = 0.2 is after end_percent = 0.1"),
        ("DeltaConvPatch", "levels", "coarsest", "levels = 'coarsest' is not one of the choices"),
        ("DeltaConvPatch", "levels", "", "levels"),
        ("DeltaConvPatch", "deltaconv", MISSING, "deltaconv"),
        *[("DeltaConvSave", "filename", name, problem) for name, problem in escapes],
        ("DeltaConvSave", "filename", "a:b", "characters that are not allowed"),
        ("DeltaConvSave", "filename", "bad_inputs_existing", "already exists"),  # overwrite off
        ("DeltaConvAttentionLocality", "sigma", NAN, "sigma = nan"),
        ("DeltaConvAttentionLocality", "sigma", 0.0, "sigma"),
        ("DeltaConvAttentionLocality", "width", 10**9, "width"),
        ("DeltaConvAttentionLocality", "width", "wide", "width"),
        ("DeltaConvAttentionLocality", "max_queries", 0, "max_queries"),
        ("DeltaConvAttentionLocality", "seed", -1, "seed"),
        ("DeltaConvAttentionLocality", "positive", MISSING, "positive"),
        ("DeltaConvAttentionLocality", "model", Via({"copykv": {"class_type": "DeltaConvTestCopyKV", "inputs": {
            "model": ["unet", 0]}}}, ["copykv", 0]), "nothing to measure"),  # every call falls back
        ("DeltaConvCompare", "patched_model", ["unet", 0], "carries no ΔConv patch"),
        ("DeltaConvCompare", "cfg", NAN, "cfg = nan"),
        ("DeltaConvCompare", "steps", 0, "steps"),
        ("DeltaConvCompare", "steps", 10**12, "steps"),
        ("DeltaConvCompare", "denoise", 5.0, "denoise"),
        ("DeltaConvCompare", "sampler_name", "warp", "sampler_name"),
        ("DeltaConvCompare", "scheduler", None, "scheduler"),
        *[("DeltaConvDistill", "filename_prefix", name, problem) for name, problem in escapes],
        ("DeltaConvDistill", "kernel_preset", "true", "kernel_preset = 'true': true is not an odd whole number"),
        ("DeltaConvDistill", "kernel_preset", "x", "kernel_preset = 'x' is neither a number nor JSON"),
        ("DeltaConvDistill", "kernel_preset", None, "kernel_preset = "),
        ("DeltaConvDistill", "kernel_preset", "8", "8 is not an odd whole number"),
        ("DeltaConvDistill", "kernel_preset", "99999", "99999 is not an odd whole number"),
        ("DeltaConvDistill", "kernel_preset", huge, "kernel_preset"),
        ("DeltaConvDistill", "kernel_preset", '{"no_such_block": 7}', "this model does not have"),
        ("DeltaConvDistill", "learning_rate", NAN, "learning_rate = nan"),
        ("DeltaConvDistill", "learning_rate", 0.0, "learning_rate"),
        ("DeltaConvDistill", "steps", 0, "steps"),
        ("DeltaConvDistill", "batch_size", 10**6, "batch_size"),
        ("DeltaConvDistill", "warmup_steps", -1, "warmup_steps"),
        ("DeltaConvDistill", "min_snr_gamma", NAN, "min_snr_gamma = nan"),
        ("DeltaConvDistill", "stage", "C: everything", "stage"),
        ("DeltaConvDistill", "training_dtype", "fp64", "training_dtype"),
        ("DeltaConvDistill", "latents", MISSING, "latents"),
        # Names whose characters pass but whose bytes do not fit the file system: refused before anything runs.
        ("DeltaConvDistill", "filename_prefix", "é" * 120, too_long),
        ("DeltaConvDistill", "filename_prefix", "日" * 80, too_long),
        ("DeltaConvDistill", "filename_prefix", "runs/" + "é" * 150 + "/a", too_long),  # a subfolder
        ("DeltaConvDistill", "filename_prefix", deep_path, "bytes per path"),
        ("DeltaConvDistill", "filename_prefix", "a\nb", "characters that are not allowed"),
        ("DeltaConvDistill", "filename_prefix", "\x1b[31mred", "characters that are not allowed"),
        ("DeltaConvSave", "filename", "é" * 125, too_long),
        ("DeltaConvSave", "filename", "ж" * 130, too_long),
        ("DeltaConvSave", "filename", deep_path, "bytes per path"),
        ("DeltaConvSave", "filename", "a\x00b", "characters that are not allowed"),
        # Block tensors that would only give NaN images, or are no floating-point weights at all.
        ("DeltaConvLoad", "weights_name", "bad_inputs_nan.safetensors", "holds NaN or infinite values"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_inf.safetensors", "holds NaN or infinite values"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_int8.safetensors", "has dtype int8"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_int64.safetensors", "has dtype int64"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_bool.safetensors", "has dtype bool"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_fp8.safetensors", "has dtype float8_e4m3fn"),
        ("DeltaConvPatch", "deltaconv", loaded("bad_inputs_nan.safetensors"), "holds NaN or infinite values"),
        # Metadata damaged, nested past the recursion limit, megabytes long or full of terminal escapes.
        ("DeltaConvLoad", "weights_name", "bad_inputs_nested_blocks.safetensors", "damaged ΔConv metadata"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_huge_family.safetensors", "damaged ΔConv metadata (family"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_huge_setting.safetensors", "unknown block setting"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_huge_format.safetensors", "is not a version number"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_escape_names.safetensors", "disagree on blocks ['\\x1b"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_nested_training.safetensors", "training is not valid JSON"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_nested_fingerprints.safetensors", "site_fingerprints is not"),
        ("DeltaConvLoad", "weights_name", "bad_inputs_list_training.safetensors", "training is list"),
        # A damaged checkpoint connected to resume: refused naming the file and what is missing, before training.
        ("DeltaConvDistill", "deltaconv", loaded("bad_inputs_resume_no_step.safetensors"),
         "bad_inputs_resume_no_step.safetensors: damaged training state, cannot resume from it: the training info "
         "has no step count"),
        ("DeltaConvDistill", "deltaconv", loaded("bad_inputs_resume_config_text.safetensors"),
         "has no configuration with a stage"),
        ("DeltaConvDistill", "deltaconv", loaded("bad_inputs_resume_no_rng.safetensors"), "random-number state"),
        ("DeltaConvDistill", "deltaconv", loaded("bad_inputs_resume_names_text.safetensors"),
         "no list of block names"),
        # Compare of two families: refused before sampling, naming both.
        ("DeltaConvCompare", "model", sdxl, "model is SDXL"),
        # Megabyte inputs and escapes: short messages, every value quoted.
        ("DeltaConvDistill", "mediator_schedule", mega, "mediator_schedule = 'xxx"),
        ("DeltaConvDistill", "mediator_schedule", ",".join(["0.0:4"] * 200_000), "starts must increase strictly"),
        ("DeltaConvDistill", "mediator_schedule", "0.0:4,0.5:\x1b[2J16", "\\x1b[2J16"),
        ("DeltaConvDistill", "mediator_schedule", "0.0:0", "must be a whole number ≥ 1"),
        ("DeltaConvDistill", "mediator_schedule", "0.5:4", "must start at 0.0"),
        ("DeltaConvDistill", "kernel_preset", mega, "neither a number nor JSON"),
        ("DeltaConvDistill", "kernel_preset", DEEP, "neither a number nor JSON"),
        ("DeltaConvDistill", "kernel_preset", json.dumps({mega: 7}), "this model does not have"),
        ("DeltaConvDistill", "kernel_preset", json.dumps({"\x1b]0;pwned\x07": 7}), "this model does not have"),
        ("DeltaConvDistill", "student", "transformer", "student = 'transformer' is not one of the choices"),
        ("DeltaConvDistill", "save_every", 10**12, "save_every"),
        ("DeltaConvDistill", "grad_accumulation", 0, "grad_accumulation"),
        ("DeltaConvDistill", "training_dtype", 16, "training_dtype"),
        ("DeltaConvDistill", "seed", 2**63, "seed"),
        ("DeltaConvCompare", "seed", 2**64, "seed"),
        ("DeltaConvAttentionLocality", "height", 63, "height"),
    ]
    return table


def write_bad_files(folder: str, source: str):
    """Broken weight files in models/deltaconv: what users put there by mistake."""
    with open(source, "rb") as f:
        good = f.read()
    with open(os.path.join(folder, "bad_inputs_corrupt.safetensors"), "wb") as f:
        f.write(os.urandom(4096))
    with open(os.path.join(folder, "bad_inputs_truncated.safetensors"), "wb") as f:
        f.write(good[: len(good) // 2])
    torch.save({"w": torch.zeros(2)}, os.path.join(folder, "bad_inputs_pickle.safetensors"))  # renamed pickle
    torch.save({"w": torch.zeros(2)}, os.path.join(folder, "bad_inputs_pickle.pt"))
    save_file({"model.weight": torch.zeros(2)}, os.path.join(folder, "bad_inputs_no_blocks.safetensors"))
    from safetensors import safe_open

    with safe_open(source, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    blocks = json.loads(meta["blocks"])
    floats = {name: {**entry, "dim": float(entry["dim"])} for name, entry in blocks.items()}
    variant(folder, "float_dim", tensors, {**meta, "blocks": json.dumps(floats)})
    write_bad_tensors(folder, tensors, meta)
    write_bad_metadata(folder, tensors, meta, blocks)
    write_bad_checkpoints(folder, tensors, meta, blocks)


def variant(folder: str, name: str, tensors: dict, meta: dict):
    save_file(tensors, os.path.join(folder, f"bad_inputs_{name}.safetensors"), metadata=meta)


def write_bad_tensors(folder: str, tensors: dict, meta: dict):
    """The good file with its first block tensor NaN, infinite, or of a dtype no weights have."""
    first = sorted(tensors)[0]
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = tensors[first].clone()
        bad.view(-1)[0] = value
        variant(folder, name, {**tensors, first: bad}, meta)
    for name, dtype in (("int8", torch.int8), ("int64", torch.int64), ("bool", torch.bool),
                        ("fp8", torch.float8_e4m3fn)):
        variant(folder, name, {**tensors, first: tensors[first].to(dtype)}, meta)


def write_bad_metadata(folder: str, tensors: dict, meta: dict, blocks: dict):
    """Metadata nested past the recursion limit, megabytes long, or with terminal escapes in block names."""
    first = next(iter(blocks))
    variant(folder, "nested_blocks", tensors, {**meta, "blocks": DEEP})
    variant(folder, "huge_family", tensors, {**meta, "family": "x" * 1_000_000})
    variant(folder, "huge_setting", tensors, {**meta, "blocks": json.dumps(
        {**blocks, first: {**blocks[first], "x" * 1_000_000: 1}})})
    variant(folder, "huge_format", tensors, {**meta, "deltaconv_format": "9" * 1_000_000})
    variant(folder, "escape_names", tensors, {**meta, "blocks": json.dumps(
        {**blocks, "\x1b[31m\x1b]0;title\x07": blocks[first]})})
    variant(folder, "nested_training", tensors, {**meta, "training": DEEP})
    variant(folder, "nested_fingerprints", tensors, {**meta, "site_fingerprints": DEEP})
    variant(folder, "list_training", tensors, {**meta, "training": "[1, 2]"})


def write_bad_checkpoints(folder: str, tensors: dict, meta: dict, blocks: dict):
    """Distill checkpoints (blocks + training state) with the training info damaged in one way each."""
    state = {**tensors, "_train.rng": torch.Generator().get_state()}
    info = {"step": 1, "losses": [0.5], "config": {"stage": "A"}, "block_names": list(blocks), "skipped_steps": 0}
    damaged = {"resume_no_step": ({k: v for k, v in info.items() if k != "step"}, state),
               "resume_config_text": ({**info, "config": "A"}, state),
               "resume_no_rng": (info, {**tensors, "_train.optim.x.step": torch.zeros(())}),
               "resume_names_text": ({**info, "block_names": "all"}, state)}
    for name, (training, file_tensors) in damaged.items():
        variant(folder, name, file_tensors, {**meta, "training": json.dumps(training)})


def files_under(base: str) -> set:
    """Every file the server could have written (its log and per-user settings aside)."""
    found = set()
    for root, _, files in os.walk(base):
        if os.path.relpath(root, base).split(os.sep)[0] in ("user", "custom_nodes"):
            continue
        found.update(os.path.join(root, f) for f in files if f != "server.log")
    return found


def without_echo(answer):
    """A validation answer without `extra_info`, where ComfyUI repeats the inputs as received (March 2024: every
    input of the node, raw): what is left are the messages."""
    if isinstance(answer, dict):
        return {k: without_echo(v) for k, v in answer.items() if k != "extra_info"}
    return [without_echo(v) for v in answer] if isinstance(answer, list) else answer


def messages(phase: str, error: str) -> list[str]:
    """Each message of an answer (ComfyUI repeats a node's VALIDATE_INPUTS message once per input it names)."""
    if phase != "validation":
        return [error]
    found, stack = [], [json.loads(error)]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            found.extend(item.split("\n"))  # 0.3.64 joins a node's messages into one, a line each
    return found


def submit(server, graph) -> tuple[str, str]:
    """('validation' | 'execution' | 'ok', error text) for one prompt."""
    try:
        prompt_id = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]
    except ComfyError as e:
        return "validation", json.dumps(without_echo(json.loads(str(e).split(": ", 1)[1])), ensure_ascii=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry:
            if entry["status"]["status_str"] == "success":
                return "ok", ""
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            return "execution", " ".join(f"{e['exception_type']}: {e['exception_message']}" for e in errors)
        time.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} did not finish")


def good_digest(server, unet_inputs, seed):
    entry = server.run(txt2img("sd15", WEIGHTS, seed=seed, steps=1, unet_inputs=unet_inputs))
    cached = [n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1].get("nodes", [])]
    assert "sampler" not in cached, "the good prompt must really sample again"
    return entry["outputs"]["digest"]["digest"][0]["sha256"]


@pytest.fixture
def bad_files(server, tmp_path):
    folder = os.path.join(server.base, "models", "deltaconv")
    output = os.path.join(server.base, "output", "deltaconv")
    os.makedirs(output, exist_ok=True)
    write_bad_files(folder, os.path.join(folder, WEIGHTS))
    existing = os.path.join(folder, "bad_inputs_existing.safetensors")
    shutil.copyfile(os.path.join(folder, WEIGHTS), existing)
    links = [os.path.join(folder, "bad_inputs_link"), os.path.join(output, "bad_inputs_link")]
    for link in links:
        os.symlink(tmp_path, link)
    made = [os.path.join(folder, f"bad_inputs_{n}.safetensors") for n in BAD_FILES]
    yield str(tmp_path)
    for path in [*made, os.path.join(folder, "bad_inputs_pickle.pt"), existing, *links]:
        os.remove(path)


def test_every_bad_input_is_refused_clearly(server, unet_inputs, bad_files, record_property):
    started = time.perf_counter()
    graphs = base_graphs(unet_inputs)
    references = {seed: good_digest(server, unet_inputs, seed) for seed in (1, 2)}  # fresh runs, alternated below
    before = files_under(server.base)
    table = cases(bad_files, unet_inputs)
    failures, phases, runs = [], {"validation": 0, "execution": 0}, 0
    for node, name, value, expected in table:
        base, node_id = graphs[node]
        graph = copy.deepcopy(base)
        if value is MISSING:
            del graph[node_id]["inputs"][name]
        elif isinstance(value, Via):
            graph.update(copy.deepcopy(value.nodes))
            graph[node_id]["inputs"][name] = value.output
        else:
            graph[node_id]["inputs"][name] = value
        phase, error = submit(server, graph)
        label = f"{node}.{name} = {str(value)[:40]!r}"
        if phase == "ok" or expected not in error:
            failures.append(f"{label}: {phase}, expected {expected!r} in: {error[:400]}")
            continue
        found = messages(phase, error)
        longest = max(found, key=len)
        if len(longest) > MAX_MESSAGE or any("\x1b" in m for m in found):
            failures.append(f"{label}: a message of {len(longest)} characters or a raw escape: {longest[:400]!r}")
        phases[phase] += 1
        if phase == "execution":  # something ran: the server must still give a fresh run's result, bit for bit
            seed = 1 + runs % 2
            runs += 1
            if good_digest(server, unet_inputs, seed) != references[seed]:
                failures.append(f"{label}: the next good prompt differs from a fresh run")
        left = files_under(server.base) - before
        if left or os.listdir(bad_files):
            failures.append(f"{label}: refused at {phase} ({error[:200]}) but left files behind: "
                            f"{sorted(left)[:3]} {os.listdir(bad_files)[:3]}")
            for path in left:
                os.remove(path)
    assert not failures, f"{len(failures)} of {len(table)} cases:\n" + "\n".join(failures)
    record_property("bad_input_cases", len(table))
    print(f"\n{len(table)} bad-input cases ({phases['validation']} refused at validation, {phases['execution']} "
          f"when run), {time.perf_counter() - started:.1f} s")
    assert server.get("/object_info/DeltaConvLoad")  # still serving


def test_every_node_works_with_its_base_graph(server, unet_inputs):
    """The table's graphs are good apart from the one bad value: each runs as it is (Load and Patch in the table's
    reference runs, Distill in test_e2e_output_paths.py)."""
    for node in ("DeltaConvSave", "DeltaConvAttentionLocality", "DeltaConvCompare"):
        phase, error = submit(server, base_graphs(unet_inputs)[node][0])
        assert phase == "ok", f"{node}: {error}"
    root = os.path.join(server.base, "models", "deltaconv")
    written = [os.path.join(root, f) for f in os.listdir(root) if f.startswith("bad_inputs_good")]
    assert written, "Save wrote its file"
    for path in written:
        os.remove(path)
