"""ComfyUI layer of ComfyUI-DeltaConv: thin node classes over deltaconv_core."""
from .compare import DeltaConvCompare
from .distill import DeltaConvDistill
from .distill_simple import DeltaConvDistillSimple
from .folders import register_folder
from .load import DeltaConvLoad
from .locality import DeltaConvAttentionLocality
from .patch import DeltaConvPatch
from .save import DeltaConvSave

register_folder()

NODE_CLASS_MAPPINGS = {
    "DeltaConvLoad": DeltaConvLoad,
    "DeltaConvPatch": DeltaConvPatch,
    "DeltaConvDistill": DeltaConvDistill,
    "DeltaConvDistillSimple": DeltaConvDistillSimple,
    "DeltaConvSave": DeltaConvSave,
    "DeltaConvAttentionLocality": DeltaConvAttentionLocality,
    "DeltaConvCompare": DeltaConvCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DeltaConvLoad": "ΔConv Load",
    "DeltaConvPatch": "ΔConv Patch",
    "DeltaConvDistill": "ΔConv Distill",
    "DeltaConvDistillSimple": "ΔConv Distill (simple)",
    "DeltaConvSave": "ΔConv Save",
    "DeltaConvAttentionLocality": "ΔConv Attention Locality",
    "DeltaConvCompare": "ΔConv Compare",
}
