"""ΔConv layers that follow ComfyUI's weight casting and low-VRAM streaming (comfy.ops)."""
from types import SimpleNamespace

import comfy.ops

from ..deltaconv_core.block import DepthwiseConv, RMSNorm, TimeDepthwiseConv


class ComfyDepthwiseConv(DepthwiseConv, comfy.ops.CastWeightBiasOp):
    comfy_cast_weights = True  # like manual_cast: weights cast to the activations' dtype and device per call

    def cast_weight_bias(self, x):
        return comfy.ops.cast_bias_weight(self, x)


class ComfyTimeDepthwiseConv(TimeDepthwiseConv, comfy.ops.CastWeightBiasOp):
    comfy_cast_weights = True
    cast_weight_bias = ComfyDepthwiseConv.cast_weight_bias


class ComfyRMSNorm(RMSNorm, comfy.ops.CastWeightBiasOp):
    comfy_cast_weights = True
    cast_weight_bias = ComfyDepthwiseConv.cast_weight_bias


class ComfyLinear(comfy.ops.manual_cast.Linear):
    def cast_weight_bias(self, x):  # for the block's fused output projection
        return comfy.ops.cast_bias_weight(self, x)


COMFY_OPS = SimpleNamespace(Linear=ComfyLinear, DepthwiseConv=ComfyDepthwiseConv,
                            TimeDepthwiseConv=ComfyTimeDepthwiseConv, RMSNorm=ComfyRMSNorm)
