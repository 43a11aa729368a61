"""The llm_compressor format for the floating-point and activation-quantized schemes (issue 14).

Written with compressed-tensors' own classes, as LLM Compressor writes them (0.17.0, what vLLM 0.26 and
0.32 pin): ``QuantizationScheme``/``QuantizationArgs`` (its presets NVFP4, NVFP4A16, MXFP4, MXFP4A16, MXFP8,
MXFP8A16, FP8_BLOCK, W8A8 where one is ours; built field by field otherwise) and the compressor of each format:

==============  ==========================  ===============================================================
scheme          format                      tensors per layer
==============  ==========================  ===============================================================
NVFP4(A16)      ``nvfp4-pack-quantized``    weight_packed, weight_scale (fp8), weight_global_scale
                                            (+ input_global_scale for NVFP4)
MXFP4(A16)      ``mxfp4-pack-quantized``    weight_packed, weight_scale (E8M0 uint8)
MXFP8(A16)      ``mxfp8-quantized``         weight (fp8), weight_scale (E8M0 uint8)
FP8_*           ``float-quantized``         weight (fp8), weight_scale (+ input_scale for FP8_STATIC)
INT8, INT4      ``int-quantized``           weight (int8), weight_scale
==============  ==========================  ===============================================================

(``nvfp4-pack-quantized`` and the MX formats came with compressed-tensors 0.12-0.13; 0.17.0 has all five.)
The compressor re-derives each code from our dequantized weight and our scales; the bytes must equal ours
(checked per layer). Every linear layer that is not quantized (lm_head, layers kept 16-bit) is listed in
``ignore`` (Intel's FP8_STATIC export writes ``"ignore": []``, so lm_head matches the ``Linear`` target and
transformers gives NaN logits). Weight-only schemes get a config group without ``input_activations``, so
an NVFP4A16/MXFP4A16 export is not read as the W4A4 preset.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from quantize.export.registry import ExportError
from quantize.numerics_fp import FP4_E2M1, decode, e8m0_decode, unpack_fp4
from quantize.scheme import Scheme
from quantize.weight_rules import fp8_layout, rule_name

# Our presets that compressed-tensors 0.17 names the same way.
CT_PRESETS = {"MXFP4": "MXFP4", "MXFP4A16": "MXFP4A16", "MXFP8": "MXFP8", "MXFP8A16": "MXFP8A16", "NVFP4": "NVFP4",
              "NVFP4A16": "NVFP4A16", "FP8_BLOCK": "FP8_BLOCK", "INT8": "W8A8"}


def compression_format(scheme: Scheme) -> str:
    rule = rule_name(scheme)
    if rule == "nv_fp":
        return "nvfp4-pack-quantized"
    if rule == "mx_fp":
        return "mxfp4-pack-quantized" if scheme.bits == 4 else "mxfp8-quantized"
    if rule == "fp8":
        return "float-quantized"
    if rule == "int_absmax":
        return "int-quantized"
    raise ValueError(f"{scheme.name} is an integer weight-only scheme: pack-quantized (quantize.export.compressed_tensors)")


def refusal(scheme: Scheme) -> str | None:
    """Why compressed-tensors cannot express ``scheme`` (None: it can)."""
    if scheme.name in CT_PRESETS or rule_name(scheme) in ("fp8", "int_absmax"):
        return None
    return f"{scheme.name} has no compressed-tensors equivalent"


def _args_fp8(scheme: Scheme):
    from compressed_tensors.quantization import QuantizationArgs

    layout = fp8_layout(scheme)
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                               strategy={"channel": "channel", "tensor": "tensor", "block": "block"}[layout],
                               block_structure=[128, 128] if layout == "block" else None)
    acts = None
    if scheme.quantizes_activations:
        if not scheme.act_dynamic:
            acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, strategy="tensor")
        else:
            acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=True, strategy="group",
                                    group_size=scheme.act_group_size)
    return weights, acts


def _args_int(scheme: Scheme):
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=True, dynamic=False, strategy="channel")
    acts = QuantizationArgs(num_bits=scheme.act_bits, type="int", symmetric=True, dynamic=True, strategy="token")
    return weights, acts


def ct_scheme(scheme: Scheme, targets: list[str]):
    """compressed-tensors' ``QuantizationScheme`` for ours."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if scheme.name in CT_PRESETS:
        return preset_name_to_scheme(CT_PRESETS[scheme.name], targets)
    weights, acts = (_args_fp8 if rule_name(scheme) == "fp8" else _args_int)(scheme)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)


def quantization_config(source):
    """One config group per scheme (the most common targets ``Linear``, the others name their layers) and
    every unquantized linear in ``ignore``."""
    from compressed_tensors.quantization import QuantizationConfig

    by_scheme: dict[Scheme, list[str]] = defaultdict(list)
    for name, w in source.layers.items():
        by_scheme[w.scheme].append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))
    formats = {compression_format(s) for s in by_scheme}
    groups = {}
    for i, (scheme, names) in enumerate(ordered):
        groups[f"group_{i}"] = ct_scheme(scheme, ["Linear"] if i == 0 else sorted(names))
        if len(formats) > 1:
            groups[f"group_{i}"].format = compression_format(scheme)
    ignore = sorted(n for n in source.linear_shapes if n not in source.layers)
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", ignore=ignore)


@contextlib.contextmanager
def _eager_fp4_cast():
    """compressed-tensors' FP4 cast is wrapped in ``torch.compile`` (compiling it costs minutes on a CPU);
    the function itself computes the same values, so the compressors run it eagerly here."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    compiled = FP4_E2M1_DATA.__dict__["cast_to_fp4"]
    eager = getattr(compiled.__func__, "__wrapped__", None)
    if eager is None:
        yield
        return
    FP4_E2M1_DATA.cast_to_fp4 = staticmethod(eager)
    try:
        yield
    finally:
        FP4_E2M1_DATA.cast_to_fp4 = compiled


def _compressor(fmt: str):
    from compressed_tensors.compressors import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
        MXFP4PackedCompressor,
        MXFP8QuantizationCompressor,
        NVFP4PackedCompressor,
    )

    return {"nvfp4-pack-quantized": NVFP4PackedCompressor, "mxfp4-pack-quantized": MXFP4PackedCompressor,
            "mxfp8-quantized": MXFP8QuantizationCompressor, "float-quantized": FloatQuantizationCompressor,
            "int-quantized": IntQuantizationCompressor}[fmt]


def _values(t: torch.Tensor, packed: bool) -> torch.Tensor:
    """Element values of stored codes (float32): FP4 nibbles decoded, FP8 / int8 cast. Compared as values:
    from a dequantized weight the compressor writes ``+0`` where we keep the sign of a ``-0`` code."""
    return decode(unpack_fp4(t), FP4_E2M1) if packed else t.float()


def layer_tensors(name: str, w) -> dict[str, torch.Tensor]:
    """One layer's compressed tensors, made by compressed-tensors' compressor and checked against ours."""
    scheme = w.scheme
    fmt = compression_format(scheme)
    rule = rule_name(scheme)
    state = {"weight": w.dequantize(torch.float32)}
    if rule == "mx_fp":
        state["weight_scale"] = e8m0_decode(w.scales)
    elif rule == "nv_fp":
        state["weight_scale"] = w.scales.float()
        state["weight_global_scale"] = w.extra["weight_global_scale"].float().reshape(1)
    else:
        state["weight_scale"] = w.scales.float()
    with _eager_fp4_cast():
        packed = _compressor(fmt).compress(state, ct_scheme(scheme, [name]))
    key = "weight_packed" if "weight_packed" in packed else "weight"
    same = torch.equal(_values(packed[key], key == "weight_packed"), _values(w.q, key == "weight_packed"))
    if not same or not torch.equal(packed["weight_scale"].float(), w.scales.float()):
        raise ExportError(f"layer {name}: compressed-tensors' {fmt} compressor re-derived other codes or scales than ours; please report this")
    out = dict(packed)
    if rule == "fp8" and fp8_layout(scheme) == "tensor":
        out["weight_scale"] = out["weight_scale"].reshape(1)
    for k in ("input_global_scale", "input_scale"):
        if k in w.extra:
            out[k] = w.extra[k].float().reshape(1)
    return out


def compressed_tensors(source) -> dict[str, torch.Tensor]:
    state = dict(source.tensors)
    for name, w in source.layers.items():
        state.update({f"{name}.{k}": v for k, v in layer_tensors(name, w).items()})
    return state
