"""ΔConv Save: DELTACONV → a .safetensors file in the deltaconv model folder."""
import os
import re

import folder_paths

from ..deltaconv_core.weights import save_weights
from .folders import FOLDER


class DeltaConvSave:
    DESCRIPTION = "Saves ΔConv blocks (e.g. from ΔConv Distill) to models/deltaconv, where ΔConv Load finds them."
    CATEGORY = "ΔConv"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "deltaconv": ("DELTACONV",),
            "filename": ("STRING", {"default": "my_deltaconv"}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }}

    def save(self, deltaconv, filename, overwrite):
        name = filename.strip()
        if not re.fullmatch(r"[\w.\- ]+", name) or name.startswith("."):
            raise ValueError(f"filename {filename!r}: use letters, digits, spaces, '.', '-' and '_' only")
        path = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name)
        if not path.endswith(".safetensors"):
            path += ".safetensors"
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists: choose another filename or turn on overwrite")
        path = save_weights(deltaconv, path, overwrite=overwrite)
        return {"ui": {"text": [path]}, "result": (path,)}
