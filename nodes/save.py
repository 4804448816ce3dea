"""ΔConv Save: DELTACONV → a .safetensors file in the deltaconv model folder."""
import os

import folder_paths

from ..deltaconv_core.weights import SAFETENSORS_SUFFIXES, save_weights
from .folders import FOLDER
from .validation import check_widgets, output_path, output_path_error, require_widgets, validates_widgets


def save_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def suffix_bytes(filename) -> int:
    """What save adds to the name: '.safetensors' unless it ends so already."""
    done = isinstance(filename, str) and filename.strip().lower().endswith(SAFETENSORS_SUFFIXES)
    return 0 if done else len(".safetensors")


@validates_widgets
class DeltaConvSave:
    DESCRIPTION = "Saves ΔConv blocks (e.g. from ΔConv Distill) to models/deltaconv, where ΔConv Load finds them."
    CATEGORY = "ΔConv/training"
    SEARCH_ALIASES = ("save deltaconv", "convfusion", "export attention blocks", "linear attention")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the written file.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "deltaconv": ("DELTACONV", {"tooltip": "The blocks to save, e.g. ΔConv Distill's deltaconv output."}),
            "filename": ("STRING", {"default": "my_deltaconv", "tooltip": "File name inside models/deltaconv "
                                                                          "(.safetensors is added); subfolders "
                                                                          "such as 'runs/a' are fine, paths "
                                                                          "leading outside are refused."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, **widgets):
        checked = check_widgets(cls, widgets)
        if checked is not True:
            return checked
        filename = widgets.get("filename")
        return output_path_error(save_folder(), filename, "filename", suffix_bytes(filename))

    def save(self, deltaconv, filename, overwrite):
        require_widgets(type(self), locals())
        path = output_path(save_folder(), filename, "filename", suffix_bytes(filename))
        if not path.lower().endswith(SAFETENSORS_SUFFIXES):
            path += ".safetensors"
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists: choose another filename or turn on overwrite")
        path = save_weights(deltaconv, path, overwrite=overwrite)
        return {"ui": {"text": [path]}, "result": (path,)}
