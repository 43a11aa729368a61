"""The linear method of the SGLang plugin: the shared packed-parameter method
(quantize.integrations.packed_linear) with SGLang's own parameter classes (their loaders take the rank
from the layer, unlike vLLM's)."""

from __future__ import annotations

from sglang.srt.layers import parameter as sglang_parameter
from sglang.srt.layers.quantization.base_config import LinearMethodBase

from quantize.integrations.packed_linear import PackedLinearMethod


class AutoRoundLinearMethod(PackedLinearMethod, LinearMethodBase):
    engine = "SGLang"
    parameter_classes = sglang_parameter
