"""ComfyUI layer of ComfyUI-DeltaConv: thin node classes over deltaconv_core."""
from .folders import register_folder
from .load import DeltaConvLoad
from .patch import DeltaConvPatch

register_folder()

NODE_CLASS_MAPPINGS = {
    "DeltaConvLoad": DeltaConvLoad,
    "DeltaConvPatch": DeltaConvPatch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DeltaConvLoad": "ΔConv Load",
    "DeltaConvPatch": "ΔConv Patch",
}
