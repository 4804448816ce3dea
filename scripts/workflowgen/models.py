"""The model files the example workflows use: name, download URL and ComfyUI folder (the missing-model dialog)."""


def hf(repo, path, directory, name=None):
    return {"name": name or path.rsplit("/", 1)[-1], "url": f"https://huggingface.co/{repo}/resolve/main/{path}",
            "directory": directory}


MODELS = {
    "dreamshaper": hf("Lykon/DreamShaper", "DreamShaper_8_pruned.safetensors", "checkpoints"),
    "dreamshaper_inpaint": hf("Lykon/DreamShaper", "DreamShaper_8_INPAINTING.inpainting.safetensors", "checkpoints"),
    "sdxl": hf("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", "checkpoints"),
    "pixart": hf("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "transformer/diffusion_pytorch_model.safetensors",
                 "diffusion_models", name="PixArt-Sigma-XL-2-1024-MS.safetensors"),
    "t5xxl": hf("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors", "text_encoders"),
    "sdxl_vae": hf("stabilityai/sdxl-vae", "sdxl_vae.safetensors", "vae"),
    "canny": hf("comfyanonymous/ControlNet-v1-1_fp16_safetensors", "control_v11p_sd15_canny_fp16.safetensors",
                "controlnet"),
    "pixel_lora": hf("artificialguybr/pixelartredmond-1-5v-pixel-art-loras-for-sd-1-5",
                     "PixelArtRedmond15V-PixelArt-PIXARFK.safetensors", "loras"),
    "ipadapter_sd15": hf("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", "ipadapter"),
    "clip_vision_h": hf("h94/IP-Adapter", "models/image_encoder/model.safetensors", "clip_vision",
                        name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    "wan21_t2v_1.3b": hf("Comfy-Org/Wan_2.1_ComfyUI_repackaged",
                         "split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors", "diffusion_models"),
    "umt5_xxl": hf("Comfy-Org/Wan_2.1_ComfyUI_repackaged",
                   "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
    "wan21_vae": hf("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/vae/wan_2.1_vae.safetensors", "vae"),
    **{f"dc_{k}": hf("7eu7d7/ConvFusion", f"ConvFusion-{k}-mjv5.safetensors", "deltaconv")
       for k in ("sd15", "sdxl", "pixart1024")},
}

# Files the user makes in ComfyUI (ΔConv Distill + ΔConv Save): nothing to download, so no entry above.
USER_FILES = {"sd15_mediators": "my_sd15_mediators.safetensors",
              "wan_deltaconv": "wan21_t2v_1.3b_deltaconv.safetensors"}
