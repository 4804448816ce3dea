"""Cancel during ΔConv Distill, through ComfyUI's real /interrupt route: the blocks are saved and named in the log,
the prompt ends interrupted with nothing downstream run, and the checkpoint resumes."""
import glob
import os
import re
import shutil
import time

from deltaconv_core.weights import read_training_state

COND = {"tokens": 16, "dim": 768, "pooled_dim": 0}


def distill_graph(unet_inputs, prefix, steps, save_every, start=None):
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", **unet_inputs}},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **COND}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 2, **COND}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "distill": {"class_type": "DeltaConvDistill", "inputs": {
            "model": ["unet", 0], "latents": ["latent", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "stage": "A", "steps": steps, "learning_rate": 1e-3, "batch_size": 2, "seed": 0,
            "save_every": save_every, "filename_prefix": prefix, "warmup_steps": 0, "training_dtype": "fp32",
            "allow_cpu": True}},
        "save": {"class_type": "DeltaConvSave", "inputs": {"deltaconv": ["distill", 0], "filename": f"{prefix}_saved",
                                                           "overwrite": False}},
    }
    if start is not None:
        graph["load"] = {"class_type": "DeltaConvLoad", "inputs": {"weights_name": start}}
        graph["distill"]["inputs"]["deltaconv"] = ["load", 0]
    return graph


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cancel_saves_names_the_checkpoint_stops_downstream_and_resumes(server, unet_inputs):
    output = os.path.join(server.base, "output", "deltaconv")
    prompt_id = server.queue(distill_graph(unet_inputs, "cancelled", steps=100_000, save_every=3))
    wait_for(lambda: glob.glob(os.path.join(output, "**", "cancelled*_A_*.safetensors"), recursive=True), 240,
             "the first checkpoint")  # training is under way
    server.post("/interrupt", {})

    entry = server.ended(prompt_id, timeout=120)
    kinds = [message[0] for message in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, kinds
    assert "execution_error" not in kinds
    assert "save" not in entry.get("outputs", {})  # the downstream output node never ran
    assert not os.path.exists(os.path.join(server.base, "models", "deltaconv", "cancelled_saved.safetensors"))

    found = re.search(r"ΔConv Distill: cancelled at step (\d+); checkpoint saved to (.+?) \(connect it",
                      server.log_text())
    assert found, server.log_text()[-3000:]
    step, path = int(found[1]), found[2]
    assert step >= 3 and read_training_state(path)[1]["step"] == step

    # The checkpoint resumes: one more step continues from the saved one. (A copy in models/deltaconv: ComfyUI of
    # March 2024 has no --output-directory, so its test server moves the output folder after Load listed it.)
    os.makedirs(os.path.join(server.base, "models", "deltaconv"), exist_ok=True)
    shutil.copy(path, os.path.join(server.base, "models", "deltaconv", "cancelled_copy.safetensors"))
    resumed = distill_graph(unet_inputs, "resumed", steps=step + 1, save_every=0, start="cancelled_copy.safetensors")
    assert "save" in server.run(resumed)["outputs"]
    assert re.search(rf"resuming .*cancelled_copy\.safetensors'? at step {step}\b", server.log_text())
    final = glob.glob(os.path.join(output, "**", f"resumed*_A_{step + 1:07d}.safetensors"), recursive=True)
    assert len(final) == 1 and len(read_training_state(final[0])[1]["losses"]) == step + 1
