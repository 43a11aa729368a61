"""The SGLang plugin's MoE method: per-expert auto_round tensors in SGLang's ``FusedMoE`` layer, through
what both engines share (quantize.integrations.packed_moe): the parameters SGLang's expert loader fills
(``quant_method: group``, ``is_transposed``, as for its own GPTQ MoE method), one quantize.kernels kernel
per projection, the routed tokens run expert by expert. SGLang's own auto-round MoE path serves 4/8-bit
sym experts only (Marlin or its Triton WNA16 kernel); this one serves every bit width and layout we write.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.moe.fused_moe_triton import FusedMoeWeightScaleSupported
from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase
from sglang.srt.utils import set_weight_attrs

from quantize.checkpoint import ConfigError
from quantize.integrations.packed_moe import check_activation, expert_parameters, experts_forward, prepare_experts
from quantize.scheme import Scheme


class AutoRoundMoEMethod(FusedMoEMethodBase):
    """Packed per-expert tensors in, each expert computed by quantize.kernels."""

    def __init__(self, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        super().__init__()
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.kernel = kernel

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        if getattr(layer, "moe_ep_size", 1) > 1:
            raise ConfigError(f"MoE layer {self.prefix}: expert parallelism is not served yet: drop --ep-size")
        attrs = {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.GROUP.value, "is_transposed": True}
        params = expert_parameters(self.scheme, self.layout, self.prefix, num_experts, hidden_size,
                                   intermediate_size_per_partition, getattr(layer, "moe_tp_size", 1))
        for name, p in params.items():
            layer.register_parameter(name, p)
            set_weight_attrs(p, attrs)
        layer.moe_shape = (hidden_size, intermediate_size_per_partition, params_dtype)

    def create_moe_runner(self, layer, moe_runner_config) -> None:
        check_activation(moe_runner_config.activation, self.prefix, moe_runner_config.apply_router_weight_on_input)
        self.moe_runner_config = moe_runner_config

    def process_weights_after_loading(self, layer) -> None:
        prepare_experts(layer, self.scheme, self.layout, *layer.moe_shape, self.kernel)

    def apply(self, layer, dispatch_output) -> StandardCombineInput:
        topk = dispatch_output.topk_output
        out = experts_forward(layer, dispatch_output.hidden_states, topk.topk_weights, topk.topk_ids)
        scale = self.moe_runner_config.routed_scaling_factor
        return StandardCombineInput(hidden_states=out if not scale else out * scale)
