"""Bad values for the inputs of every ΔConv node, each queued through POST /prompt on the running server.

Each case must be refused with a clear error (at validation, or when the node runs, with our message), the server
must keep serving, the next good prompt must give the result a fresh run gives, bit for bit, and no file may be
left behind. Graphs are the tiny SD1.5 model's and run one step; cases refused at validation run nothing.
"""
import copy
import json
import os
import shutil
import time
import uuid

import pytest
import torch
from graphs import txt2img
from safetensors.torch import save_file

from devkit.comfy_server import ComfyError

NAN, MISSING = float("nan"), object()
COND = {"tokens": 16, "dim": 768, "pooled_dim": 0}
WEIGHTS = "tiny_sd15_random.safetensors"
BAD_FILES = ("corrupt", "truncated", "pickle", "no_blocks", "float_dim")


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
            "model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "stage": "A: block-local",
            "steps": 1, "learning_rate": 1e-3, "batch_size": 1, "seed": 0, "save_every": 0,
            "filename_prefix": "bad_inputs_good", "warmup_steps": 0, "training_dtype": "fp32", "allow_cpu": True}},
            "show": {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["distill", 2]}}}, "distill"),
    }


def cases(outside):
    """(node, input, value, what the error must say): bad types, ranges, empties, huge values, bad files, escapes."""
    huge = "x" * 100_000
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
        ("DeltaConvAttentionLocality", "model", ["copykv", 0], "nothing to measure"),  # every call falls back
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
    for entry in blocks.values():
        entry["dim"] = float(entry["dim"])
    save_file(tensors, os.path.join(folder, "bad_inputs_float_dim.safetensors"),
              metadata={**meta, "blocks": json.dumps(blocks)})


def files_under(base: str) -> set:
    """Every file the server could have written (its log and per-user settings aside)."""
    found = set()
    for root, _, files in os.walk(base):
        if os.path.relpath(root, base).split(os.sep)[0] in ("user", "custom_nodes"):
            continue
        found.update(os.path.join(root, f) for f in files if f != "server.log")
    return found


def submit(server, graph) -> tuple[str, str]:
    """('validation' | 'execution' | 'ok', error text) for one prompt."""
    try:
        prompt_id = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]
    except ComfyError as e:
        return "validation", json.dumps(json.loads(str(e).split(": ", 1)[1]), ensure_ascii=False)
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
    table = cases(bad_files)
    failures, phases, runs = [], {"validation": 0, "execution": 0}, 0
    for node, name, value, expected in table:
        base, node_id = graphs[node]
        graph = copy.deepcopy(base)
        if value is MISSING:
            del graph[node_id]["inputs"][name]
        elif name == "model" and value == ["copykv", 0]:
            graph["copykv"] = {"class_type": "DeltaConvTestCopyKV", "inputs": {"model": ["unet", 0]}}
            graph[node_id]["inputs"][name] = value
        else:
            graph[node_id]["inputs"][name] = value
        phase, error = submit(server, graph)
        label = f"{node}.{name} = {str(value)[:40]!r}"
        if phase == "ok" or expected not in error:
            failures.append(f"{label}: {phase}, expected {expected!r} in: {error[:400]}")
            continue
        phases[phase] += 1
        if phase == "execution":  # something ran: the server must still give a fresh run's result, bit for bit
            seed = 1 + runs % 2
            runs += 1
            if good_digest(server, unet_inputs, seed) != references[seed]:
                failures.append(f"{label}: the next good prompt differs from a fresh run")
        left = files_under(server.base) - before
        if left or os.listdir(bad_files):
            failures.append(f"{label}: left files behind: {sorted(left)[:3]} {os.listdir(bad_files)[:3]}")
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
