"""The ``fp8`` format: DeepSeek-V3-style block FP8 (``quant_method: "fp8"``), the layout of DeepSeek-V3 and
Qwen3-FP8 checkpoints, which transformers (``FineGrainedFP8Config``), vLLM (``Fp8Config`` with
``weight_block_size``) and SGLang load natively.

Per quantized linear:

- ``<name>.weight``: ``float8_e4m3fn`` ``[out, in]``;
- ``<name>.weight_scale_inv``: float32 ``[ceil(out/128), ceil(in/128)]``; despite the name it is the
  dequantization multiplier, ``w = fp8 * scale_inv`` per block (a partial block at the edge has its own).

Both are FP8_BLOCK's final form as tuning produced it (``QuantizedWeight.q`` / ``.scales``, from
``numerics_fp8.quantize_weight`` via ``weight_rules``), written as they are: the same bytes as the
``weight`` / ``weight_scale`` of our llm_compressor FP8_BLOCK export. The config's activations are dynamic
FP8 per token and 128 channels, which is FP8_BLOCK's activation rule; so only FP8_BLOCK fits (a
weight-only or per-channel FP8 scheme would be served with activations it was not tuned for).

``modules_to_not_convert`` lists every linear kept 16-bit, lm_head included: transformers reads that key
(``ignored_layers`` is its alias), vLLM reads ``ignored_layers`` and falls back to it, matching exact names.

Partial blocks are written as the format defines them; consumers differ (tests/test_export_fp8.py): vLLM wants
fused shards before the last (q, k; gate) to have multiples of 128 rows, and transformers 5.19's CPU
dequantization refuses a partial last block row after full ones (it divides rows by scale rows).
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantize.export.hf_folder import write_hf_folder
from quantize.export.registry import ExportError, FormatSpec, exporter, refusal
from quantize.export.source import ExportSource
from quantize.numerics_fp8 import BLOCK
from quantize.scheme import SCHEMES, Scheme
from quantize.weight_rules import clip_shape


def holds(scheme: Scheme) -> str | None:
    if scheme == SCHEMES["FP8_BLOCK"]:
        return None
    others = [f for f in ("auto_round", "llm_compressor") if refusal(FormatSpec(f), scheme) is None]
    return (f"format fp8 (DeepSeek-style quant_method fp8) holds FP8_BLOCK only (FP8 E4M3 weights in 128x128 blocks, "
            f"activations FP8 per 1x128 group, dynamic), not {scheme.name}: quantize with --scheme FP8_BLOCK"
            + (f", or write {scheme.name} with --format {' or '.join(others)}" if others else ""))


def quantization_config(source: ExportSource) -> dict:
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": sorted(n for n in source.linear_shapes if n not in source.layers),
    }


def layer_tensors(name: str, w) -> dict:
    n, k = w.q.shape
    if w.q.dtype != torch.float8_e4m3fn or tuple(w.scales.shape) != clip_shape(w.scheme, n, k):
        raise ExportError(f"layer {name}: expected float8_e4m3fn codes and {list(clip_shape(w.scheme, n, k))} block scales, "
                          f"got {w.q.dtype} and {list(w.scales.shape)}; please report this")
    return {"weight": w.q, "weight_scale_inv": w.scales.float()}


@exporter("fp8", summary="DeepSeek-style block FP8 (quant_method fp8; FP8_BLOCK only)", holds=holds)
def write_fp8(source: ExportSource, folder: Path, option: str | None = None) -> None:
    heads = [n for n in source.layers if n.rpartition(".")[2] == "lm_head"]
    if heads:
        # vLLM's Fp8Config quantizes LinearBase layers only: its ParallelLMHead stays 16-bit.
        raise ExportError(f"format fp8 keeps {', '.join(heads)} 16-bit (vLLM's fp8 method has no FP8 lm_head): "
                          "quantize without --quant-lm-head")
    state = dict(source.tensors)
    for name, w in source.layers.items():
        state.update({f"{name}.{k}": t for k, t in layer_tensors(name, w).items()})
    write_hf_folder(source, folder, state, quantization_config(source))
