"""The llm_compressor format: compressed-tensors ``pack-quantized`` (``quant_method: "compressed-tensors"``),
what LLM Compressor writes and what transformers and vLLM load natively.

The config and the packed tensors are made by the compressed-tensors library's own classes
(``QuantizationConfig``, ``PackedQuantizationCompressor``, ``ModelCompressor.update_config``); this
module only hands them our scales and zero points. compressed-tensors keeps codes signed
(``q - 2**(bits-1)``) and zero points in that same signed range, so ours are shifted by ``2**(bits-1)``;
its compressor re-derives each code from the dequantized weight, which gives back our code exactly
(``w / scale`` is within float32 rounding of an integer), and the test checks it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from quantize.export.hf_folder import write_hf_folder
from quantize.export.registry import ExportError, exporter
from quantize.export.source import ExportSource
from quantize.requires import COMPRESSED_TENSORS
from quantize.scheme import Scheme


def _args(scheme: Scheme):
    from compressed_tensors.quantization import QuantizationArgs

    grouped = scheme.group_size != -1
    return QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.sym,
        strategy="group" if grouped else "channel", group_size=scheme.group_size if grouped else None,
    )


def quantization_config(source: ExportSource):
    """One config group per scheme; the most common targets every ``Linear``, the others name their
    layers (compressed-tensors and vLLM prefer an exact name over a class). Unquantized linears are ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    by_scheme: dict[Scheme, list[str]] = defaultdict(list)
    for name, w in source.layers.items():
        by_scheme[w.scheme].append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))
    groups = {}
    for i, (scheme, names) in enumerate(ordered):
        targets = ["Linear"] if i == 0 else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=_args(scheme))
    ignore = sorted(n for n in source.linear_shapes if n not in source.layers)
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed", ignore=ignore)


def compressed_tensors(source: ExportSource) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    state = dict(source.tensors)
    for name, w in source.layers.items():
        half = 2 ** (w.scheme.bits - 1)
        scheme = QuantizationScheme(targets=[name], weights=_args(w.scheme))
        local = {
            "weight": w.dequantize(torch.float32),
            "weight_scale": w.scales,
            "weight_zero_point": (w.zeros.to(torch.int16) - half).to(torch.int8),
        }
        packed = PackedQuantizationCompressor.compress(local, scheme)
        if not _round_trips(packed, w, scheme):
            raise ExportError(f"layer {name}: compressed-tensors re-derived different codes from our weights; please report this")
        state.update({f"{name}.{k}": v for k, v in packed.items()})
    return state


def _round_trips(packed: dict, w, scheme) -> bool:
    """compressed-tensors' decompressor gives back our dequantized weight (checked layer by layer)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    back = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    return torch.equal(back.to(torch.float16), w.dequantize(torch.float16))


def holds(scheme: Scheme) -> str | None:
    """Integer weight-only schemes as pack-quantized; the FP and activation-quantized ones in their own
    compressed-tensors formats (quantize.export.compressed_tensors_fp)."""
    from quantize.export import compressed_tensors_fp

    return None if scheme.integer_weight_only else compressed_tensors_fp.refusal(scheme)


@exporter("llm_compressor", summary="compressed-tensors pack-quantized (LLM Compressor's format)", requires=COMPRESSED_TENSORS,
          holds=holds)
def write_compressed_tensors(source: ExportSource, folder: Path, option: str | None = None) -> None:
    from compressed_tensors.compressors import ModelCompressor

    from quantize.export import compressed_tensors_fp

    kinds = {w.scheme.integer_weight_only for w in source.layers.values()}
    if kinds == {False}:
        config = compressed_tensors_fp.quantization_config(source)
        write_hf_folder(source, folder, compressed_tensors_fp.compressed_tensors(source), None)
        ModelCompressor(quantization_config=config).update_config(str(folder))
        return
    if len(kinds) > 1:
        raise ExportError("llm_compressor: one checkpoint holds either integer weight-only layers or FP/activation-quantized ones, not both")
    config = quantization_config(source)
    write_hf_folder(source, folder, compressed_tensors(source), None)
    ModelCompressor(quantization_config=config).update_config(str(folder))
