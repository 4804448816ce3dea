"""ΔConv Load: a weights file from models/deltaconv → DELTACONV."""
import folder_paths

from ..deltaconv_core.quoting import quoted
from ..deltaconv_core.weights import load_weights
from .folders import FOLDER


class DeltaConvLoad:
    DESCRIPTION = ("Loads ΔConv blocks (an official ConvFusion release or a file made by ΔConv Distill/Save) from "
                   "models/deltaconv; files made by ΔConv Distill may hold mediator-attention students too, or "
                   "instead, with their mediator schedule. Only .safetensors files are read.")
    CATEGORY = "ΔConv"
    SEARCH_ALIASES = ("load deltaconv", "convfusion", "attention", "speed", "linear attention", "load weights")
    RETURN_TYPES = ("DELTACONV",)
    RETURN_NAMES = ("deltaconv",)
    OUTPUT_TOOLTIPS = ("The blocks, per self-attention site, for ΔConv Patch (or ΔConv Distill to resume).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list(FOLDER)
        return {"required": {"weights_name": (files, {
            "default": files[0] if files else "",
            "tooltip": "A .safetensors (or .sft) file in models/deltaconv, or a checkpoint of ΔConv Distill in "
                       "output/deltaconv. Official ConvFusion files: see weights/README.md."})}}

    def load(self, weights_name):
        path = folder_paths.get_full_path(FOLDER, weights_name)
        if path is None:
            raise FileNotFoundError(f"{quoted(weights_name)} is not in the deltaconv model folders "
                                    f"{folder_paths.get_folder_paths(FOLDER)}")
        return (load_weights(path),)
