"""The "auto-round" quantization config for vLLM: parses the checkpoint's ``quantization_config`` with
the project's own validator and hands each linear layer its scheme. Imported only inside vLLM."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from quantize.checkpoint import QUANT_METHOD, CheckpointConfig
from quantize.integrations.packed_linear import CheckpointConfigMethods, merged_scheme, refuse_quantized_lm_head
from quantize.integrations.vllm.linear import AutoRoundFPLinearMethod, AutoRoundLinearMethod

@register_quantization_config(QUANT_METHOD)
class AutoRoundVllmConfig(CheckpointConfigMethods, QuantizationConfig):
    """Serves every integer weight-only auto_round checkpoint (gptq / awq / native packing, bits 2/3/4/8,
    sym and asym, per-layer schemes) through quantize.kernels."""

    def __init__(self, checkpoint: CheckpointConfig, kernel: str | None = None):
        super().__init__()
        self.checkpoint = checkpoint
        self.kernel = kernel

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoRoundVllmConfig":
        return cls(CheckpointConfig.from_dict(config), kernel=config.get("kernel"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Models whose vLLM module names differ from the checkpoint's rename our layer names too.
        c = self.checkpoint
        self.checkpoint = dataclasses.replace(
            c,
            block_name_to_quantize=hf_to_vllm_mapper.apply_list(c.block_name_to_quantize),
            extra_config=hf_to_vllm_mapper.apply_dict(c.extra_config),
        )

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            refuse_quantized_lm_head(self.checkpoint, prefix, "vLLM")
        if not isinstance(layer, LinearBase):
            from quantize.integrations.packed_moe import experts_scheme
            from quantize.integrations.vllm.moe import MOE_LAYER, AutoRoundMoEMethod, marlin_moe_method

            if isinstance(layer, MOE_LAYER):  # MoE experts: per-expert tensors (integrations/vllm/moe.py)
                scheme = experts_scheme(self.checkpoint, prefix, layer.global_num_experts, "vLLM")
                layout = self.checkpoint.layout
                fused = None if self.kernel else marlin_moe_method(scheme, layout, layer)  # a forced kernel wins
                return fused or AutoRoundMoEMethod(layer.moe_config, scheme, layout, prefix, self.kernel)
            return None  # embeddings and the lm_head stay as vLLM builds them
        scheme = merged_scheme(self.checkpoint, prefix, self.packed_modules_mapping, "vLLM")
        if scheme is None:
            return UnquantizedLinearMethod()
        if not scheme.integer_weight_only:  # MX / NV / FP8 (integrations/fp_linear.py)
            return AutoRoundFPLinearMethod(scheme, prefix, self.kernel)
        return AutoRoundLinearMethod(scheme, self.checkpoint.layout, prefix, self.kernel)
