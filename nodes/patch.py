"""ΔConv Patch: MODEL + DELTACONV → MODEL whose self-attention runs ΔConv blocks."""
from ..deltaconv_core.families import LEVEL_CHOICES
from .patching import patch_model


class DeltaConvPatch:
    DESCRIPTION = ("Replaces the model's self-attention layers with ΔConv blocks (a clone; the input model is "
                   "untouched). Calls that other patches rearrange, and steps outside the chosen range, use the "
                   "original attention.")
    CATEGORY = "ΔConv"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        pct = {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}
        return {"required": {
            "model": ("MODEL",),
            "deltaconv": ("DELTACONV",),
            "start_percent": ("FLOAT", {**pct, "tooltip": "ΔConv runs from this point of sampling on (0 = first step)."}),
            "end_percent": ("FLOAT", {**pct, "default": 1.0, "tooltip": "…until this point (1 = last step)."}),
            "levels": (list(LEVEL_CHOICES), {"tooltip": "Replace every level, or only the finest one or two "
                                                         "resolution levels (where attention costs most)."}),
            "strict": ("BOOLEAN", {"default": False, "tooltip": "Refuse when the file lacks blocks for some "
                                                                "selected sites instead of leaving them on attention."}),
        }}

    def patch(self, model, deltaconv, start_percent, end_percent, levels, strict):
        patched, report, _ = patch_model(model, deltaconv, start_percent, end_percent, levels, strict)
        return (patched, report)
