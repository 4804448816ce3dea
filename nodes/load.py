"""ΔConv Load: a weights file from models/deltaconv → DELTACONV."""
import folder_paths

from ..deltaconv_core.weights import load_weights
from .folders import FOLDER


class DeltaConvLoad:
    DESCRIPTION = ("Loads ΔConv blocks (an official ConvFusion release or a file made by ΔConv Distill/Save) from "
                   "models/deltaconv; files made by ΔConv Distill may hold mediator-attention students too, or "
                   "instead, with their mediator schedule. Only .safetensors files are read.")
    CATEGORY = "ΔConv"
    RETURN_TYPES = ("DELTACONV",)
    RETURN_NAMES = ("deltaconv",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weights_name": (folder_paths.get_filename_list(FOLDER),
                                              {"tooltip": "File in models/deltaconv (or output/deltaconv)."})}}

    def load(self, weights_name):
        path = folder_paths.get_full_path(FOLDER, weights_name)
        if path is None:
            raise FileNotFoundError(f"{weights_name} is not in the deltaconv model folders "
                                    f"{folder_paths.get_folder_paths(FOLDER)}")
        return (load_weights(path),)
