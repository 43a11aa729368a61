"""The linear method of the SGLang plugin: the shared packed-parameter method
(quantize.integrations.packed_linear) with SGLang's own parameter classes (their loaders take the rank
from the layer, unlike vLLM's), and SGLang's Marlin kernel where it applies (CUDA, sym 4/8-bit;
quantize.integrations.sglang.marlin)."""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers import parameter as sglang_parameter
from sglang.srt.layers.quantization.base_config import LinearMethodBase

from quantize.integrations.fp_linear import FPLinearMethod
from quantize.integrations.packed_linear import PackedLinearMethod
from quantize.integrations.sglang.marlin import marlin_kernel

logger = logging.getLogger(__name__)
_reported: set[tuple] = set()


class AutoRoundLinearMethod(PackedLinearMethod, LinearMethodBase):
    engine = "SGLang"
    parameter_classes = sglang_parameter

    def engine_marlin(self, layer: torch.nn.Module):
        spec = layer.quant_spec
        # SGLang's linear layers keep the full input size; params_dtype is the activation dtype.
        return marlin_kernel(self.scheme, self.layout, spec.in_features, spec.out_features, layer.input_size,
                             layer.params_dtype, layer.qweight.device)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        # One line per (scheme, layout, kernel) and process: which kernel serves which layers.
        key = (self.scheme, self.layout, layer.quant_kernel.__name__)
        if key not in _reported:
            _reported.add(key)
            logger.info("quantize-llm: %s (%s, %s layout) computes with %s", self.prefix, self.scheme.name, self.layout,
                        layer.quant_kernel.__name__)


class AutoRoundFPLinearMethod(FPLinearMethod, LinearMethodBase):
    """MX / NV / FP8 layers (quantize.integrations.fp_linear), with SGLang's parameter classes."""

    engine = "SGLang"
    parameter_classes = sglang_parameter
