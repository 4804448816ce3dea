"""Pure-PyTorch core of ComfyUI-DeltaConv (never imports ComfyUI)."""
from .attention import DeltaConvDiTAttention, DeltaConvSelfAttention, PatchRuntime, infer_grid
from .block import BlockConfig, DeltaConvBlock, build_block
from .families import AttentionSite, ModelSites, UnsupportedModelError, find_attention_sites
from .weights import DeltaConvWeights, WeightFileError, load_weights, save_weights

__all__ = ["AttentionSite", "BlockConfig", "DeltaConvBlock", "DeltaConvDiTAttention", "DeltaConvSelfAttention",
           "DeltaConvWeights", "ModelSites", "PatchRuntime", "UnsupportedModelError", "WeightFileError",
           "build_block", "find_attention_sites", "infer_grid", "load_weights", "save_weights"]
