"""The example workflows, one function each: (title, graph, note). Add one by writing a function with @workflow;
its name is the file name in workflows/."""
from .graph import DC_NOTE, NEG, Model, N, Seed, deltaconv, distill, output, prompts, sampler, sd15_base
from .models import MODELS, USER_FILES

WORKFLOWS = {}


def workflow(fn):
    WORKFLOWS[fn.__name__] = fn
    return fn


@workflow
def deltaconv_sd15_txt2img_compare():
    g = sd15_base(size=768)
    g |= {"ks_attn": sampler(("ckpt", 0), ("latent", 0), Seed(123456789, "fixed"), title="KSampler (attention)"),
          "ks_dc": sampler(("dc_patch", 0), ("latent", 0), Seed(123456789, "fixed"), title="KSampler (ΔConv)"),
          **output(("ks_attn", 0), ("ckpt", 2), "deltaconv_compare/attention", "_attn"),
          **output(("ks_dc", 0), ("ckpt", 2), "deltaconv_compare/deltaconv", "_dc")}
    return ("SD1.5 · attention vs ΔConv, same seed", g,
            "Same prompt, same seed, two samplers: the plain model (self-attention) and the ΔConv-patched clone. "
            "Both seeds are fixed: change them together. Compare the two images and the two sampler times in the "
            "console.\nModels: DreamShaper 8 (the checkpoint the SD1.5 ΔConv blocks were distilled from) in "
            "models/checkpoints; ConvFusion-sd15-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_compare_psnr_ssim():
    g = sd15_base(pos="a red vintage bicycle leaning against a sunlit brick wall, flowers in the basket, photograph")
    g |= {"compare": N("DeltaConvCompare", color="purple", model=("ckpt", 0), patched_model=("dc_patch", 0),
                       vae=("ckpt", 2), positive=("pos", 0), negative=("neg", 0), latent_image=("latent", 0),
                       seed=Seed(123456789, "fixed"), steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras",
                       denoise=1.0),
          "save_original": N("SaveImage", "Original (attention)", images=("compare", 0),
                             filename_prefix="deltaconv_compare/original"),
          "save_patched": N("SaveImage", "Patched (ΔConv)", images=("compare", 1),
                            filename_prefix="deltaconv_compare/deltaconv"),
          "heat_map": N("PreviewImage", "Difference heat map", images=("compare", 2))}
    return ("SD1.5 · ΔConv Compare: PSNR, SSIM, heat map", g,
            "ΔConv Compare samples the original model and the ΔConv-patched clone from the same seed and settings "
            "(as KSampler does), decodes both and measures what the patch costs on your prompt: PSNR and SSIM per "
            "image, a heat map of the per-pixel difference (its scale is in the report) and both sampling times. "
            "The report, PSNR and SSIM show in the Preview Any nodes after a run (the report is in the console too)."
            "\nModels: DreamShaper 8 in models/checkpoints; ConvFusion-sd15-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_compare_students():
    g = sd15_base(pos="a red vintage bicycle leaning against a sunlit brick wall, flowers in the basket, photograph")
    same = dict(vae=("ckpt", 2), positive=("pos", 0), negative=("neg", 0), latent_image=("latent", 0),
                seed=Seed(123456789, "fixed"), steps=25, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras",
                denoise=1.0)
    g |= {"med_load": N("DeltaConvLoad", "ΔConv Load (your mediator file)", "purple",
                        weights_name=USER_FILES["sd15_mediators"]),
          "med_patch": N("DeltaConvPatch", "ΔConv Patch (mediators)", "purple", model=("ckpt", 0),
                         deltaconv=("med_load", 0), start_percent=0.0, end_percent=1.0, levels="all", strict=False,
                         mediator_schedule=""),
          "compare_dc": N("DeltaConvCompare", "Compare: attention vs ΔConv", "purple", model=("ckpt", 0),
                          patched_model=("dc_patch", 0), **same),
          "compare_med": N("DeltaConvCompare", "Compare: attention vs mediators", "purple", model=("ckpt", 0),
                           patched_model=("med_patch", 0), **same),
          "save_attention": N("SaveImage", "Attention (original)", images=("compare_dc", 0),
                              filename_prefix="deltaconv_students/attention"),
          "save_dc": N("SaveImage", "ΔConv", images=("compare_dc", 1), filename_prefix="deltaconv_students/deltaconv"),
          "save_med": N("SaveImage", "Mediator attention", images=("compare_med", 1),
                        filename_prefix="deltaconv_students/mediators"),
          "heat_dc": N("PreviewImage", "Difference: ΔConv", images=("compare_dc", 2)),
          "heat_med": N("PreviewImage", "Difference: mediators", images=("compare_med", 2))}
    return ("SD1.5 · attention vs ΔConv vs mediator attention", g,
            "One prompt, one seed, three ways to run self-attention: the original model, ΔConv blocks "
            "(convolutions) and mediator attention (global attention through a few pooled mediator tokens, more of "
            "them as denoising proceeds). Each ΔConv Compare samples the original and one patched model from the "
            "same settings and reports PSNR, SSIM, a difference heat map, both sampling times and how often each "
            "student ran (mediator calls by count).\nMediator weights: there is no official release. Make "
            f"{USER_FILES['sd15_mediators']} yourself with ΔConv Distill (student: mediators; see the "
            "data-free distillation workflow) and ΔConv Save; ΔConv Patch's mediator_schedule overrides its "
            "schedule (e.g. 0.0:4,0.5:16,0.8:64; empty: the one it was trained with).\nModels: DreamShaper 8 in "
            "models/checkpoints; ConvFusion-sd15-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sdxl_txt2img():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("sdxl")),
         **prompts(("ckpt", 1), "a lighthouse on a cliff above a stormy sea, dramatic clouds, golden hour, "
                                "cinematic photograph"),
         "latent": N("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         **deltaconv(("ckpt", 0), "dc_sdxl"),
         "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42)), **output(("ks", 0), ("ckpt", 2), "deltaconv_sdxl")}
    return ("SDXL · ΔConv txt2img 1024²", g,
            "SDXL base 1.0 with every self-attention layer replaced by ΔConv blocks.\nModels: sd_xl_base_1.0 in "
            "models/checkpoints; ConvFusion-sdxl-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_pixart_sigma_txt2img():
    text = "a red fox curled up asleep in autumn leaves, soft morning light, detailed fur"
    g = {"unet": N("UNETLoader", unet_name=Model("pixart"), weight_dtype="default"),
         "clip": N("CLIPLoader", clip_name=Model("t5xxl"), type="pixart", device="default"),
         "vae": N("VAELoader", vae_name=Model("sdxl_vae")),
         "pos": N("CLIPTextEncodePixArtAlpha", "Positive", "green", width=1024, height=1024, text=text,
                  clip=("clip", 0)),
         "neg": N("CLIPTextEncodePixArtAlpha", "Negative", "red", width=1024, height=1024, text=NEG,
                  clip=("clip", 0)),
         "latent": N("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         **deltaconv(("unet", 0), "dc_pixart1024"),
         "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), steps=20, cfg=4.5, sampler_name="euler",
                       scheduler="normal"),
         **output(("ks", 0), ("vae", 0), "deltaconv_pixart")}
    return ("PixArt-Σ · ΔConv txt2img 1024²", g,
            "PixArt-Σ-XL-2-1024-MS with all 28 self-attention layers replaced by ΔConv blocks (needs ComfyUI with "
            "PixArt support, 2025 on).\nModels: PixArt-Sigma-XL-2-1024-MS (the diffusers transformer file, renamed) "
            "in models/diffusion_models; t5xxl_fp16 in models/text_encoders; sdxl_vae in models/vae; "
            "ConvFusion-pixart1024-mjv5 in models/deltaconv.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_controlnet():
    g = sd15_base(pos="a futuristic glass house in a lush garden, architectural photograph")
    g |= {"image": N("LoadImage", image="example.png"),
          "canny": N("Canny", image=("image", 0), low_threshold=0.4, high_threshold=0.8),
          "canny_preview": N("PreviewImage", images=("canny", 0)),
          "cn": N("ControlNetLoader", control_net_name=Model("canny")),
          "cn_apply": N("ControlNetApplyAdvanced", positive=("pos", 0), negative=("neg", 0), control_net=("cn", 0),
                        image=("canny", 0), strength=1.0, start_percent=0.0, end_percent=1.0),
          "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), pos=("cn_apply", 0), neg=("cn_apply", 1)),
          **output(("ks", 0), ("ckpt", 2), "deltaconv_controlnet")}
    return ("SD1.5 · ΔConv + ControlNet (canny)", g,
            "ControlNet works through cross-attention and the UNet's residuals, so it combines with the "
            "ΔConv-patched model unchanged. Load your own image; its edges steer the composition.\nModels: "
            "DreamShaper 8; control_v11p_sd15_canny_fp16 in models/controlnet; ConvFusion-sd15-mjv5.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_ipadapter():
    g = sd15_base(pos="a portrait of a woman in a garden, soft light, best quality")
    g |= {"image": N("LoadImage", "Reference image", image="example.png"),
          "ipa_loader": N("IPAdapterUnifiedLoader", model=("dc_patch", 0), preset="STANDARD (medium strength)"),
          "ipa": N("IPAdapter", model=("ipa_loader", 0), ipadapter=("ipa_loader", 1), image=("image", 0), weight=0.8,
                   start_at=0.0, end_at=1.0, weight_type="standard"),
          "ks": sampler(("ipa", 0), ("latent", 0), Seed(42)), **output(("ks", 0), ("ckpt", 2), "deltaconv_ipadapter")}
    g["ipa_loader"]["models"] = [MODELS["ipadapter_sd15"], MODELS["clip_vision_h"]]
    return ("SD1.5 · ΔConv + IP-Adapter", g,
            "IP-Adapter (cubiq/ComfyUI_IPAdapter_plus, install it with ComfyUI-Manager) injects the reference image "
            "through cross-attention, which ΔConv leaves alone: patch first, then apply IP-Adapter.\nModels: "
            "DreamShaper 8; ip-adapter_sd15 in models/ipadapter and CLIP-ViT-H-14-laion2B-s32B-b79K in "
            "models/clip_vision (the STANDARD preset); ConvFusion-sd15-mjv5.\n" + DC_NOTE)


@workflow
def deltaconv_sd15_inpaint():
    g = sd15_base("dreamshaper_inpaint", pos="a vase of sunflowers on the table, oil painting")
    del g["latent"]
    g |= {"image": N("LoadImage", "Image + mask (mask editor)", image="example.png"),
          "encode": N("VAEEncodeForInpaint", pixels=("image", 0), vae=("ckpt", 2), mask=("image", 1), grow_mask_by=6),
          "ks": sampler(("dc_patch", 0), ("encode", 0), Seed(42)),
          **output(("ks", 0), ("ckpt", 2), "deltaconv_inpaint")}
    return ("SD1.5 inpainting · ΔConv", g,
            "Inpainting with an SD1.5 inpainting checkpoint (9-channel UNet), patched with ΔConv. Draw the mask on "
            "the Load Image node (right click → Open in MaskEditor).\nModels: DreamShaper 8 INPAINTING in "
            "models/checkpoints; ConvFusion-sd15-mjv5 (distilled from DreamShaper 8: same layers; distill your own "
            "blocks for the inpainting model for best results).\n" + DC_NOTE)


@workflow
def deltaconv_sd15_lora():
    g = sd15_base(pos="Pixel Art, PixArFK, a knight resting by a campfire in a forest at night")
    g |= {"lora": N("LoraLoader", model=("ckpt", 0), clip=("ckpt", 1), lora_name=Model("pixel_lora"),
                    strength_model=1.0, strength_clip=1.0),
          "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42)), **output(("ks", 0), ("ckpt", 2), "deltaconv_lora")}
    g["pos"]["inputs"]["clip"] = g["neg"]["inputs"]["clip"] = ("lora", 1)
    g["dc_patch"]["inputs"]["model"] = ("lora", 0)
    return ("SD1.5 · LoRA → ΔConv Patch", g,
            "Load the LoRA first, then patch. LoRA weights on the replaced self-attention layers have no effect while "
            "ΔConv runs (the patch report counts them); all others apply as usual.\nModels: DreamShaper 8; "
            "PixelArtRedmond15V (trigger words: Pixel Art, PixArFK) in models/loras; ConvFusion-sd15-mjv5.\n"
            + DC_NOTE)


@workflow
def deltaconv_sdxl_hires_2048():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("sdxl")),
         **prompts(("ckpt", 1), "an overgrown ancient temple in a jungle valley, waterfalls, aerial view, intricate "
                                "detail, 8k photograph"),
         "latent": N("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         **deltaconv(("ckpt", 0), "dc_sdxl"),
         "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), title="KSampler 1024²"),
         "upscale": N("LatentUpscaleBy", samples=("ks", 0), upscale_method="nearest-exact", scale_by=2.0),
         "ks_hires": sampler(("dc_patch", 0), ("upscale", 0), Seed(43), steps=20, denoise=0.5,
                             title="KSampler 2048² (denoise 0.5)"),
         **output(("ks_hires", 0), ("ckpt", 2), "deltaconv_hires_2048")}
    return ("SDXL hires fix 2048² · ΔConv both passes", g,
            "Two-pass hires fix: 1024² → latent ×2 → 2048² at denoise 0.5, both passes on the ΔConv-patched "
            "model. "
            "At 2048² self-attention dominates the cost; this is where ΔConv's linear cost pays most.\nModels: "
            "sd_xl_base_1.0; ConvFusion-sdxl-mjv5.\n" + DC_NOTE)


def teacher_samples():
    """Data-free distillation's training latents: the checkpoint's own samples of a few varied prompts."""
    return {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("dreamshaper")),
            **prompts(("ckpt", 1), "a beautiful landscape, a portrait, an animal, a city street, best quality", ""),
            "latent": N("EmptyLatentImage", width=512, height=512, batch_size=8),
            "teacher": sampler(("ckpt", 0), ("latent", 0), Seed(1, "fixed"), steps=20, title="Teacher samples")}


@workflow
def deltaconv_distill_data_free():
    g = {**teacher_samples(),
         **distill(("ckpt", 0), ("teacher", 0), "my_sd15_deltaconv")}
    return ("ΔConv Distill · data-free (teacher samples)", g,
            "Trains ΔConv blocks for your own checkpoint with no dataset: the model's own samples are the training "
            "latents. Stage A (block-local) is cheap; stage B (end-to-end) is the paper's recipe. Blocks are saved "
            "to models/deltaconv (ΔConv Save), checkpoints to output/deltaconv every save_every steps; connect a "
            "checkpoint (ΔConv Load) as deltaconv to resume. Needs a GPU (allow_cpu for tests only).\nModels: any "
            "SD1.x/SDXL/PixArt checkpoint (DreamShaper 8 here).")


@workflow
def deltaconv_distill_simple():
    g = {**teacher_samples(),
         **distill(("ckpt", 0), ("teacher", 0), "my_sd15_deltaconv_simple", preset="quick")}
    return ("ΔConv Distill (simple) · pick a preset", g,
            "The easiest way to make ΔConv blocks for your own checkpoint: the model's own samples are the training "
            "latents, and a preset chooses every setting. Run check first (2 steps per stage, any machine), then "
            "quick (stage A) or full (stage A, then stage B, the paper's recipe; far more memory). fine_tune "
            "trains blocks connected as deltaconv (ΔConv Load), e.g. the official ones for a fine-tuned "
            "checkpoint. The console lists every ΔConv Distill setting a preset used. Blocks are saved to "
            "models/deltaconv (ΔConv Save), checkpoints to output/deltaconv. Needs a GPU, except check.\nModels: "
            "any SD1.x/SDXL/PixArt checkpoint (DreamShaper 8 here).")


@workflow
def deltaconv_distill_image_folder():
    g = {"ckpt": N("CheckpointLoaderSimple", ckpt_name=Model("dreamshaper")),
         **prompts(("ckpt", 1), "best quality photograph", ""),
         "images": N("LoadImageSetFromFolderNode", folder="deltaconv_training", resize_method="Stretch"),
         "resize": N("ImageScale", image=("images", 0), upscale_method="lanczos", width=512, height=512,
                     crop="center"),
         "encode": N("VAEEncode", pixels=("resize", 0), vae=("ckpt", 2)),
         **distill(("ckpt", 0), ("encode", 0), "my_sd15_deltaconv_images")}
    return ("ΔConv Distill · image folder", g,
            "Trains ΔConv blocks on your images: put them in ComfyUI/input/deltaconv_training, they are resized to "
            "512², VAE-encoded and used as training latents with one caption. For large runs (captions per image, "
            "several GPUs) use scripts/distill.py.\nModels: any SD1.x/SDXL/PixArt checkpoint (DreamShaper 8 here).")


WAN_NOTE = ("Models (Wan 2.1 T2V 1.3B, Comfy-Org's repackaged files): wan2.1_t2v_1.3B_fp16 in models/diffusion_models; "
            "umt5_xxl_fp8_e4m3fn_scaled in models/text_encoders; wan_2.1_vae in models/vae. Needs ComfyUI with Wan "
            "support (2025 on).")
WAN_SAMPLING = dict(steps=30, cfg=6.0, sampler_name="uni_pc", scheduler="simple")


def wan_base(pos):
    """Wan 2.1 T2V 1.3B: its diffusion model, umt5_xxl text encoder and VAE, the prompts; a video latent."""
    return {"unet": N("UNETLoader", unet_name=Model("wan21_t2v_1.3b"), weight_dtype="default"),
            "clip": N("CLIPLoader", clip_name=Model("umt5_xxl"), type="wan", device="default"),
            "vae": N("VAELoader", vae_name=Model("wan21_vae")),
            **prompts(("clip", 0), pos, "static, blurry, low quality, worst quality, deformed, watermark, text")}


def video(frames, width=832, height=480, batch_size=1):
    return N("EmptyHunyuanLatentVideo", width=width, height=height, length=frames, batch_size=batch_size)


@workflow
def deltaconv_wan_t2v():
    g = wan_base("a red fox trotting through fresh snow in a pine forest, soft morning light, cinematic")
    g |= {"latent": video(33),
          "dc_load": N("DeltaConvLoad", "ΔConv Load (your distilled students)", "purple",
                       weights_name=USER_FILES["wan_deltaconv"]),
          "dc_patch": N("DeltaConvPatch", color="purple", model=("unet", 0), deltaconv=("dc_load", 0),
                        start_percent=0.0, end_percent=1.0, levels="all", strict=False),
          "ks": sampler(("dc_patch", 0), ("latent", 0), Seed(42), **WAN_SAMPLING),
          "decode": N("VAEDecode", samples=("ks", 0), vae=("vae", 0)),
          "save": N("SaveAnimatedWEBP", images=("decode", 0), filename_prefix="deltaconv_wan/t2v", fps=16.0,
                    lossless=False, quality=90, method="default"),
          "compare_latent": video(9),
          "compare": N("DeltaConvCompare", "ΔConv Compare (9 frames)", "purple", model=("unet", 0),
                       patched_model=("dc_patch", 0), vae=("vae", 0), positive=("pos", 0), negative=("neg", 0),
                       latent_image=("compare_latent", 0), seed=Seed(123456789, "fixed"), denoise=1.0,
                       **WAN_SAMPLING),
          "save_original": N("SaveAnimatedWEBP", "Original (attention)", images=("compare", 0),
                             filename_prefix="deltaconv_wan/compare_attention", fps=16.0, lossless=False, quality=90,
                             method="default"),
          "save_patched": N("SaveAnimatedWEBP", "Patched (ΔConv)", images=("compare", 1),
                            filename_prefix="deltaconv_wan/compare_deltaconv", fps=16.0, lossless=False, quality=90,
                            method="default"),
          "heat_map": N("PreviewImage", "Difference heat map (per frame)", images=("compare", 2))}
    return ("Wan 2.1 T2V 1.3B · ΔConv text to video", g,
            "Text to video (33 frames, 832×480) with every self-attention layer of Wan 2.1 T2V 1.3B replaced by your "
            "distilled students, saved as an animated WebP. ΔConv Compare samples the original and the patched "
            "model on 9 frames from the same seed and reports PSNR, SSIM (over all frames), a per-frame difference "
            "heat map and both sampling times.\nStudents: there is no official release for Wan. Make "
            f"{USER_FILES['wan_deltaconv']} yourself with the Wan distillation workflow (deltaconv_distill_wan: "
            "ΔConv Distill + ΔConv Save) and put it in models/deltaconv.\n" + WAN_NOTE)


@workflow
def deltaconv_distill_wan():
    g = wan_base("a busy city street at night, a dog running on a beach, ocean waves, a person walking in a park, "
                 "birds flying over a lake")
    g |= {"latent": video(17, 480, 320, batch_size=4),
          "teacher": sampler(("unet", 0), ("latent", 0), Seed(1, "fixed"), title="Teacher samples",
                             **{**WAN_SAMPLING, "steps": 20}),
          **distill(("unet", 0), ("teacher", 0), "wan21_t2v_1.3b_deltaconv", preset="quick",
                    try_latent=video(17, 480, 320), vae=("vae", 0), **{**WAN_SAMPLING, "steps": 20}),
          "try_save": N("SaveAnimatedWEBP", "Try the student", images=("try_decode", 0),
                        filename_prefix="deltaconv_wan/student", fps=16.0, lossless=False, quality=90,
                        method="default")}
    del g["try_preview"]
    return ("ΔConv Distill · Wan 2.1 video, data-free", g,
            "Makes ΔConv students for Wan 2.1 T2V 1.3B with no dataset: the model's own video samples (17 frames, "
            "480×320, four at a time) are the training latents. ΔConv Distill (simple) trains 3-D ΔConv blocks "
            "(convolutions across frames too); run check first, then quick or full. ΔConv Save writes "
            f"{USER_FILES['wan_deltaconv']} to models/deltaconv, for the Wan text-to-video workflow "
            "(deltaconv_wan_t2v); checkpoints go to output/deltaconv. For mediator students or your own settings use "
            "ΔConv Distill (student: mediators). Needs a GPU, except check.\n" + WAN_NOTE)
