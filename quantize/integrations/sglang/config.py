"""The "auto-round" quantization config for SGLang: parses the checkpoint's ``quantization_config`` with
the project's own validator and hands each linear layer, and each MoE layer's experts, its scheme.
Imported only inside SGLang."""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

from quantize.checkpoint import CheckpointConfig
from quantize.export.fused import FUSED
from quantize.integrations.packed_linear import CheckpointConfigMethods, merged_scheme, refuse_quantized_lm_head
from quantize.integrations.packed_moe import experts_scheme
from quantize.integrations.sglang.linear import AutoRoundFPLinearMethod, AutoRoundLinearMethod


class AutoRoundSglangConfig(CheckpointConfigMethods, QuantizationConfig):
    """Serves every integer weight-only auto_round checkpoint (gptq / awq / native packing, bits 2/3/4/8,
    sym and asym, per-layer schemes) through quantize.kernels."""

    def __init__(self, checkpoint: CheckpointConfig, kernel: str | None = None, packed_modules_mapping: dict | None = None):
        super().__init__()
        self.checkpoint = checkpoint
        self.kernel = kernel
        # Most SGLang model classes declare no packed_modules_mapping although they fuse q/k/v and gate/up.
        self.packed_modules_mapping = {**{k: list(v) for k, v in FUSED.items()}, **(packed_modules_mapping or {})}
        # SGLang's model files read these two attributes of an "auto-round" config.
        self.packing_format = checkpoint.packing_format
        self.backend = kernel or "auto"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoRoundSglangConfig":
        # SGLang's loader adds the model class's packed_modules_mapping (which layers it fuses) to the dict.
        config = dict(config)
        mapping = config.pop("packed_modules_mapping", None)
        return cls(CheckpointConfig.from_dict(config), kernel=config.get("kernel"), packed_modules_mapping=mapping)

    def get_scaled_act_names(self) -> list[str]:
        return []

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            refuse_quantized_lm_head(self.checkpoint, prefix, "SGLang")
        if isinstance(layer, FusedMoE):  # MoE experts: per-expert tensors (integrations/sglang/moe.py)
            from quantize.integrations.sglang.moe import AutoRoundMoEMethod

            routed = layer.num_experts - getattr(layer, "num_fused_shared_experts", 0)
            scheme = experts_scheme(self.checkpoint, prefix, routed, "SGLang")
            return AutoRoundMoEMethod(scheme, self.checkpoint.layout, prefix, self.kernel)
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the lm_head stay as SGLang builds them
        scheme = merged_scheme(self.checkpoint, prefix, self.packed_modules_mapping, "SGLang")
        if scheme is None:
            return UnquantizedLinearMethod()
        if not scheme.integer_weight_only:  # MX / NV / FP8 (integrations/fp_linear.py)
            return AutoRoundFPLinearMethod(scheme, prefix, self.kernel)
        return AutoRoundLinearMethod(scheme, self.checkpoint.layout, prefix, self.kernel)
