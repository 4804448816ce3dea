"""Data-free distillation through a real ComfyUI server: teacher samples → ΔConv Distill → ΔConv Save → Load/Patch."""
import os

from graphs import digest, txt2img


def test_distill_save_load_patch_sample(server, unet_inputs):
    unet = {"unet_name": "tiny_sd15.safetensors", **unet_inputs}
    cond = {"tokens": 16, "dim": 768, "pooled_dim": 0}
    graph = {
        "unet": {"class_type": "UNETLoader", "inputs": unet},
        "pos": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "DeltaConvTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "teacher": {"class_type": "KSampler", "inputs": {  # data-free: the teacher's own samples are the data
            "model": ["unet", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "distill": {"class_type": "DeltaConvDistill", "inputs": {
            "model": ["unet", 0], "latents": ["teacher", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "stage": "A", "steps": 4, "learning_rate": 1e-3, "batch_size": 2, "seed": 0,
            "save_every": 2, "filename_prefix": "e2e_distill", "warmup_steps": 0, "training_dtype": "fp32",
            "allow_cpu": True}},
        "save": {"class_type": "DeltaConvSave", "inputs": {"deltaconv": ["distill", 0], "filename": "e2e_saved",
                                                           "overwrite": False}},
    }
    entry = server.run(graph)
    saved = entry["outputs"]["save"]["text"][0]
    assert saved == os.path.join(server.base, "models", "deltaconv", "e2e_saved.safetensors")
    checkpoints = sorted(os.listdir(os.path.join(server.base, "output", "deltaconv")))
    assert checkpoints == ["e2e_distill_00001_A_0000002.safetensors", "e2e_distill_00001_A_0000004.safetensors"]

    d = digest(server.run(txt2img("sd15", "e2e_saved.safetensors", seed=9, unet_inputs=unet_inputs)))
    assert d["patched_sites"] == 7 and d["finite"] and d["counts"] == {"deltaconv": 7 * 3}
