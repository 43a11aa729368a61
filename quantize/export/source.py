"""What every exporter writes from: a quantized model as integer codes per layer plus its other tensors.

Two places make one: a tuning run (the model in memory and its :class:`QuantizationResult`) and an
auto_round checkpoint on disk (ours or Intel AutoRound's), so that converting a checkpoint and exporting
a fresh run go through the same writers and give the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantize.model import UserError
from quantize.scheme import Scheme
from quantize.signround import QuantizedWeight


@dataclass
class ExportSource:
    config: object  # the model's transformers config, without a quantization_config
    tensors: dict  # every stored tensor except the quantized layers' weights (or a function giving it: streamed runs)
    layers: dict[str, QuantizedWeight]  # quantized linear layers: codes, float16 scales, zero points
    linear_shapes: dict[str, tuple[int, int]]  # every nn.Linear: name -> (out_features, in_features)
    block_prefixes: list[str]  # e.g. ["model.layers"]: where the quantized blocks live
    scheme: Scheme  # the run's scheme (layers that differ are per-layer exceptions)
    dtype: torch.dtype  # the model's 16-bit dtype: unquantized and dequantized weights are stored in it
    name: str  # the model's name, for file names
    tokenizer: object = None
    generation_config: object = None
    metadata: dict = field(default_factory=dict)  # tuning settings, kept in configs as notes

    def in_block(self, name: str) -> bool:
        return any(name.startswith(p + ".") for p in self.block_prefixes)

    @property
    def kept_in_blocks(self) -> list[str]:
        """Linear layers inside the quantized blocks that stay 16-bit."""
        return [n for n in self.linear_shapes if n not in self.layers and self.in_block(n)]

    def dequantized(self, name: str) -> torch.Tensor:
        """A quantized layer's weight in the model's dtype: exactly what the tuned model computed with."""
        return self.layers[name].dequantize(self.dtype)

    @classmethod
    def from_run(cls, model: nn.Module, tokenizer, result, scheme: Scheme, metadata: dict | None = None,
                 streamer=None) -> "ExportSource":
        """From a model that :func:`quantize.quantizer.quantize_model` has just quantized. A streamed run's
        blocks are on the meta device: their other tensors are read from the source shards as they are written."""
        tensors, seen = {}, set()
        for key, t in model.state_dict().items():
            if t.is_meta:
                if key.removesuffix(".weight") not in result.weights:
                    tensors[key] = streamer.deferred(key)
                continue
            # Tied weights (lm_head sharing the embeddings) are one tensor: stored once, as save_pretrained does.
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if ptr in seen:
                continue
            seen.add(ptr)
            tensors[key] = t
        for name in result.weights:
            tensors.pop(f"{name}.weight", None)
        linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        config = model.config
        # Names as save_pretrained writes them (e.g. Mixtral's experts under block_sparse_moe): quantize.moe
        from quantize.moe import checkpoint_namer, router_shapes

        rename = checkpoint_namer(model)
        linears.update(router_shapes(model))  # 16-bit in the config, as Intel writes them

        def layer(name: str) -> str:
            return rename(name + ".weight")[: -len(".weight")]

        source = cls(
            config=config,
            tensors={rename(k): t for k, t in tensors.items()},
            layers={layer(n): w for n, w in result.weights.items()},
            linear_shapes={layer(n): s for n, s in linears.items()},
            block_prefixes=[layer(result.blocks.prefix + ".0.x")[: -len(".0.x")]],
            scheme=scheme,
            dtype=model.dtype,
            name=Path(getattr(config, "_name_or_path", "") or "model").name or "model",
            tokenizer=tokenizer,
            generation_config=getattr(model, "generation_config", None),
            metadata=dict(metadata or {}),
        )
        from quantize.mtp import add_mtp

        add_mtp(source, getattr(config, "_name_or_path", None), scheme)  # MTP layers transformers did not build
        return source


def linear_shapes_of(config) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the architecture ``config`` describes, built on the meta device (no memory), by
    checkpoint name: MoE experts per expert and routers included (quantize.moe), VLMs whole (quantize.vlm)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from quantize.moe import checkpoint_namer, router_shapes, unfuse_experts
    from quantize.vlm import is_vlm

    try:
        with torch.device("meta"):
            model = (AutoModelForImageTextToText if is_vlm(config) else AutoModelForCausalLM).from_config(config)
    except ValueError as e:
        raise UserError(f"transformers cannot build a {config.model_type} model from this checkpoint's config: {e}") from e
    unfuse_experts(model)
    rename = checkpoint_namer(model)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    shapes.update(router_shapes(model))
    return {rename(n + ".weight")[: -len(".weight")]: s for n, s in shapes.items()}
