"""Wan 2.2 TI2V 5B on a tiny random model that ComfyUI's detection takes for WAN22_T2V (48 latent channels, the
Wan 2.2 latent format, 16× spatial compression): ΔConv blocks and mediator students patched and sampled through a
real server from Wan22ImageToVideoLatent's latent, text-to-video and image-to-video. For image-to-video WAN22 keeps
the first latent frame (the start image) through a noise mask and gives each frame its own timestep (0 for the
kept one): the students still see the whole frames × h × w grid at every step, and the kept frame stays as it was."""
import pytest
import torch
from graphs import digest, txt2img

from deltaconv_core.families import find_attention_sites
from deltaconv_core.weights import load_weights
from devkit.tiny_models import SITE_COUNTS, TINY_MODELS, has_wan22_5b

pytestmark = pytest.mark.skipif(not has_wan22_5b(), reason="this ComfyUI has no Wan 2.2 TI2V 5B (WAN22_T2V)")
NAME = "tiny_wan22_5b"
SITES = SITE_COUNTS[NAME]
STEPS = 3
# 9 frames of 192 × 128 pixels: 3 latent frames of 8 × 12 (16× in space), 3 × 4 × 6 tokens.
LATENT = {"class_type": "Wan22ImageToVideoLatent", "inputs": {"vae": ["vae", 0], "width": 192, "height": 128,
                                                              "length": 9, "batch_size": 1}}
SHAPE = [1, 48, 3, 8, 12]


def graph(unet_inputs, weights, seed=5, start_frame=False, extra_models=()):
    """txt2img on the 5B model, its latent from Wan22ImageToVideoLatent (which reads its VAE only to encode a start
    image: any VAE does without one). start_frame: keep latent frame 0 as the start image (a noise mask 0 there, 1
    on the other frames, as Wan22ImageToVideoLatent makes with a start image; one mask frame per latent frame)."""
    g = txt2img("wan", weights, seed=seed, steps=STEPS, unet_inputs=unet_inputs, extra_models=extra_models)
    g["unet"]["inputs"]["unet_name"] = f"{NAME}.safetensors"
    for node in g.values():
        if node["class_type"] == "DeltaConvLoad":
            node["inputs"]["weights_name"] = node["inputs"]["weights_name"].replace("tiny_wan_", f"{NAME}_")
    g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    g["latent"] = LATENT
    if start_frame:
        g["kept"] = {"class_type": "EmptyImage", "inputs": {"width": 192, "height": 128, "batch_size": 1,
                                                            "color": 0}}
        g["new"] = {"class_type": "EmptyImage", "inputs": {"width": 192, "height": 128, "batch_size": 2,
                                                           "color": 0xFFFFFF}}
        g["frames"] = {"class_type": "ImageBatch", "inputs": {"image1": ["kept", 0], "image2": ["new", 0]}}
        g["mask"] = {"class_type": "ImageToMask", "inputs": {"image": ["frames", 0], "channel": "red"}}
        g["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["latent", 0], "mask": ["mask", 0]}}
        for node in g.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["latent_image"] = ["masked", 0]
    return g


def test_detected_as_wan22_ti2v_5b(load_tiny):
    import comfy.latent_formats
    import comfy.supported_models

    model = load_tiny(NAME)
    assert type(model.model.model_config) is comfy.supported_models.WAN22_T2V
    assert isinstance(model.model.latent_format, comfy.latent_formats.Wan22)
    sites = find_attention_sites(model.model.diffusion_model)
    assert sites.family == "wan" and len(sites.sites) == SITES and sites.patch_size == (1, 2, 2)
    assert TINY_MODELS[NAME].channels == model.model.diffusion_model.patch_embedding.in_channels == 48


@pytest.mark.parametrize("start_frame", [False, True], ids=["t2v", "i2v"])
def test_students_patch_and_sample(server, unet_inputs, tiny_models, start_frame):
    g = graph(unet_inputs, "tiny_wan_random.safetensors", start_frame=start_frame,
              extra_models=[("_mediators", "tiny_wan_mediators.safetensors"), ("_plain", None)])
    g["report"] = {"class_type": "DeltaConvTestShowText", "inputs": {"text": ["patch", 1]}}
    entry = server.run(g)
    plain = digest(entry, "_plain")
    assert plain["shape"] == SHAPE and plain["finite"]
    for suffix in ("", "_mediators"):
        d = digest(entry, suffix)
        assert d["shape"] == SHAPE and d["finite"] and d["mean_abs"] > 0
        assert d["patched_sites"] == SITES and d["sites"] == {f"blocks.{i}": STEPS for i in range(SITES)}
        # Every call ran a student: the grid was read from the 48-channel latent, no call fell back to attention.
        assert sum(n for k, n in d["counts"].items() if not k.startswith("attention:")) == SITES * STEPS, d["counts"]
        assert d["sha256"] != plain["sha256"]
    assert set(digest(entry)["counts"]) == {"deltaconv"}
    report = entry["outputs"]["report"]["text"][0]
    assert report.startswith(f"ΔConv patch: {SITES} of {SITES} self-attention sites replaced (Wan 2.x T2V"), report
    assert f"weights: {NAME}_random.safetensors: Wan 2.x" in report and "3 taps in time" in report, report
    assert load_weights(tiny_models[f"{NAME}_random"]).family == "wan"


def test_start_frame_kept_exactly_and_frames_timed_apart(pack, load_tiny, tiny_models):
    """In-process, on the latents themselves: with a kept first frame, KSampler with the patched 5B model leaves
    that frame as it was (at timestep 0 while the others denoise), changes the others, and every student
    call saw the full grid."""
    import nodes

    model = load_tiny(NAME)
    patched, _, runtime = pack.nodes.patching.patch_model(model, load_weights(tiny_models[f"{NAME}_random"]))
    g = torch.Generator().manual_seed(0)
    start = torch.randn(SHAPE, generator=g)  # latent frame 0: a start image; the rest as the latent node leaves it
    start[:, :, 1:] = 0
    mask = torch.ones(1, 1, *SHAPE[2:])
    mask[:, :, 0] = 0
    cond = [[torch.randn(1, 16, 4096, generator=g), {}]]
    uncond = [[torch.randn(1, 16, 4096, generator=g), {}]]

    def sample(m, noise_mask):
        latent = {"samples": start.clone(), **({"noise_mask": noise_mask} if noise_mask is not None else {})}
        return nodes.common_ksampler(m, 7, STEPS, 4.0, "euler", "normal", cond, uncond, latent)[0]["samples"]

    timesteps = []  # what the diffusion model is called with: WAN22 gives each latent frame its own timestep
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda _, args: timesteps.append(args[1].clone()))
    try:
        runtime.counts.clear()
        kept = sample(patched, mask)
    finally:
        hook.remove()
    assert dict(runtime.counts) == {"deltaconv": SITES * STEPS}
    assert len(timesteps) == STEPS and all(t.shape == (2, 3) for t in timesteps)  # cond and uncond × 3 frames
    assert all((t[:, 0] == 0).all() and (t[:, 1:] > 0).all() for t in timesteps)
    # (up to float rounding: the sampler scales latents in and out with Wan 2.2's per-channel means and stds)
    torch.testing.assert_close(kept[:, :, 0], start[:, :, 0], rtol=0, atol=1e-5)
    free = sample(patched, None)
    assert (free[:, :, 0] - start[:, :, 0]).abs().mean() > 0.1
    assert not torch.allclose(kept[:, :, 1:], free[:, :, 1:])  # the kept frame conditions the others
    assert not torch.allclose(kept[:, :, 1:], sample(model, mask)[:, :, 1:])  # the students ran
