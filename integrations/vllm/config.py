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

from quantize.checkpoint import QUANT_METHOD, CheckpointConfig, ConfigError, is_auto_round
from quantize.integrations.vllm.linear import AutoRoundLinearMethod
from quantize.scheme import Scheme

def part_names(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """The checkpoint layer names behind a vLLM layer: ``...qkv_proj`` is q_proj, k_proj and v_proj."""
    parent, _, leaf = prefix.rpartition(".")
    parts = packed_modules_mapping.get(leaf)
    if not parts:
        return [prefix]
    return [f"{parent}.{p}" if parent else p for p in parts]


def merged_scheme(config: CheckpointConfig, prefix: str, packed_modules_mapping: dict[str, list[str]]) -> Scheme | None:
    """The one scheme every part of layer ``prefix`` shares (None: stored unquantized)."""
    names = part_names(prefix, packed_modules_mapping)
    schemes = {name: config.layer_scheme(name) for name in names}
    if len(set(schemes.values())) > 1:
        detail = ", ".join(f"{n}: {s.name if s else '16-bit'}" for n, s in schemes.items())
        raise ConfigError(
            f"layer {prefix}: vLLM fuses {', '.join(n.rpartition('.')[2] for n in names)} into one matrix, but the "
            f"checkpoint quantizes them differently ({detail}); re-quantize with one scheme for these layers "
            f"(e.g. a layer_config entry that covers all of them)"
        )
    return schemes[names[0]]


@register_quantization_config(QUANT_METHOD)
class AutoRoundVllmConfig(QuantizationConfig):
    """Serves every integer weight-only auto_round checkpoint (gptq / awq / native packing, bits 2/3/4/8,
    sym and asym, per-layer schemes) through quantize.kernels."""

    def __init__(self, checkpoint: CheckpointConfig, kernel: str | None = None):
        super().__init__()
        self.checkpoint = checkpoint
        self.kernel = kernel

    def __repr__(self) -> str:
        c = self.checkpoint
        return f"AutoRoundVllmConfig(bits={c.bits}, group_size={c.group_size}, sym={c.sym}, packing_format={c.packing_format})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # what Triton needs; the portable torch path runs anywhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantization_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoRoundVllmConfig":
        return cls(CheckpointConfig.from_dict(config), kernel=config.get("kernel"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None) -> str | None:
        # Take auto_round checkpoints unless the user named another method (e.g. vLLM's own "inc").
        if is_auto_round(hf_quant_cfg.get("quant_method")) and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Models whose vLLM module names differ from the checkpoint's rename our layer names too.
        c = self.checkpoint
        self.checkpoint = dataclasses.replace(
            c,
            block_name_to_quantize=hf_to_vllm_mapper.apply_list(c.block_name_to_quantize),
            extra_config=hf_to_vllm_mapper.apply_dict(c.extra_config),
        )

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead) and self.checkpoint.layer_scheme(prefix) is not None:
            raise ConfigError(
                f"layer {prefix}: a quantized lm_head is not served by this plugin (vLLM pads and shards the "
                f"vocabulary of its lm_head); re-quantize without --quant-lm-head, or load it with transformers"
            )
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the lm_head stay as vLLM builds them
        scheme = merged_scheme(self.checkpoint, prefix, self.packed_modules_mapping)
        if scheme is None:
            return UnquantizedLinearMethod()
        return AutoRoundLinearMethod(scheme, self.checkpoint.layout, prefix, self.kernel)
