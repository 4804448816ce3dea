"""Pure-PyTorch core of ComfyUI-DeltaConv (never imports ComfyUI)."""
from .attention import DeltaConvDiTAttention, DeltaConvSelfAttention, PatchRuntime, infer_grid
from .block import BlockConfig, DeltaConvBlock, build_block
from .families import AttentionSite, ModelSites, UnsupportedModelError, find_attention_sites
from .mediator_schedule import MediatorSchedule, ScheduleError
from .mediators import MediatorAttention, MediatorConfig, mediator_grid, mediator_macs
from .students import build_student, student_type
from .weights import DeltaConvWeights, WeightFileError, load_weights, save_weights

__all__ = ["AttentionSite", "BlockConfig", "DeltaConvBlock", "DeltaConvDiTAttention", "DeltaConvSelfAttention",
           "DeltaConvWeights", "MediatorAttention", "MediatorConfig", "MediatorSchedule", "ModelSites", "PatchRuntime",
           "ScheduleError", "UnsupportedModelError", "WeightFileError", "build_block", "build_student",
           "find_attention_sites", "infer_grid", "load_weights", "mediator_grid", "mediator_macs", "save_weights",
           "student_type"]
