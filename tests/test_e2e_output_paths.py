"""Where ΔConv Distill and ΔConv Save write, through the real server: inside their folders, subfolders allowed,
and a second Distill run with the same prefix never replaces the first one's checkpoints.
(Escapes, symlinks and empty names are cases of the bad-input table in test_e2e_bad_inputs.py.)"""
import os

from test_e2e_bad_inputs import base_graphs


def test_distill_runs_are_numbered_and_never_replace_each_other(server, unet_inputs):
    graph, _ = base_graphs(unet_inputs)["DeltaConvDistill"]
    graph["distill"]["inputs"].update(filename_prefix="runs/numbered")
    folder = os.path.join(server.base, "output", "deltaconv", "runs")
    first = server.run(graph)["outputs"]["show"]["text"][0]
    mtime = os.path.getmtime(first)
    # the second run starts from the first's blocks; its kernel_preset cannot apply, and the log says so
    graph["load"] = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": "tiny_sd15_random.safetensors"}}
    graph["distill"]["inputs"].update(deltaconv=["load", 0], kernel_preset="5")
    second = server.run(graph)["outputs"]["show"]["text"][0]
    assert sorted(os.listdir(folder)) == [f"numbered_0000{run}_A_0000001.safetensors" for run in (1, 2)]
    assert first == os.path.join(folder, "numbered_00001_A_0000001.safetensors") != second
    assert os.path.getmtime(first) == mtime
    assert "kernel_preset is ignored: deltaconv is connected" in server.log_text()
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


def test_save_into_a_subfolder(server, unet_inputs):
    graph, _ = base_graphs(unet_inputs)["DeltaConvSave"]
    graph["save"]["inputs"]["filename"] = "runs/saved.sft"
    path = server.run(graph)["outputs"]["save"]["text"][0]
    assert path == os.path.join(server.base, "models", "deltaconv", "runs", "saved.sft") and os.path.isfile(path)
    files = server.get("/object_info/DeltaConvLoad")["DeltaConvLoad"]["input"]["required"]["weights_name"][0]
    assert "runs/saved.sft" in files  # .sft is listed (and read) as safetensors, on every ComfyUI
    load = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": "runs/saved.sft"}}
    graph = {"load": load, "save": {"class_type": "DeltaConvSave", "inputs": {
        "deltaconv": ["load", 0], "filename": "runs/saved_again", "overwrite": False}}}
    again = server.run(graph)["outputs"]["save"]["text"][0]
    for p in (path, again):
        os.remove(p)
    os.rmdir(os.path.dirname(path))
