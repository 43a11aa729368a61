"""The auto_round format for MXFP4, MXFP8, NVFP4 (and their A16 variants) and FP8_STATIC, in the layout
Intel AutoRound 0.16.1 writes (auto_round/export/export_to_autoround/export_to_nvfp_mx.py, qlinear_fp.py,
export_to_fp8.py), so that its loader reads ours and ours reads its:

- MX / NV: ``packing_format: "auto_round:llm_compressor"``, ``data_type: "mx_fp" | "nv_fp"``; per layer
  ``weight_packed`` (FP4, two per byte, compressed-tensors' nibble order) or ``weight`` (float8_e4m3fn, MXFP8),
  ``weight_scale`` (uint8 E8M0 codes for MX, float8_e4m3fn for NV), and for NV ``weight_global_scale`` [1]
  and, with quantized activations, ``input_global_scale`` [1] (float32).
- FP8_STATIC: ``packing_format: "auto_round:fp8_static"``; ``weight`` (float8_e4m3fn), ``weight_scale`` [N]
  and ``input_scale`` [1]. Intel stores these two scales in bfloat16; ours are float32 (the scales the
  tuned model computed with, exactly; loaders cast).

The activation fields (``act_bits``, ``act_data_type``, ``act_group_size``, ``act_dynamic``, ``act_sym``) are
written as Intel writes them. Layers kept 16-bit inside the blocks are named in ``extra_config`` with
``bits: 16``.

Not written in this format, each refused before tuning with the reason (``refusal``): FP8_BLOCK and FPW8A16
(Intel's ``auto_round:fp8`` writes ``group_size`` as a list ``[128, 128]`` or ``0``, which transformers'
auto-round config refuses), INT8 and INT4 (Intel's auto_round stores W8A8/W4A4 as 16-bit "fake" weights,
``packing_format: auto_round:fake``): their home is llm_compressor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantize.export.hf_folder import write_hf_folder, write_json
from quantize.scheme import Scheme
from quantize.weight_rules import rule_name
from quantize.streaming import deferred_parts

MX_NV_PACKING = "auto_round:llm_compressor"
FP8_STATIC_PACKING = "auto_round:fp8_static"
ACT_FIELDS = ("act_bits", "act_data_type", "act_group_size", "act_dynamic")


def packing_format(scheme: Scheme) -> str:
    return FP8_STATIC_PACKING if scheme.data_type == "fp" else MX_NV_PACKING


def refusal(scheme: Scheme) -> str | None:
    rule = rule_name(scheme)
    if rule in ("mx_fp", "nv_fp"):
        return None
    if rule == "fp8" and scheme.group_size == -1 and scheme.quantizes_activations and not scheme.act_dynamic:
        return None
    if rule == "fp8":
        return (f"auto_round cannot hold {scheme.name}: Intel's auto_round:fp8 layout writes group_size as [128, 128] "
                "or 0, which transformers' auto-round config refuses; use llm_compressor (float-quantized)")
    return (f"auto_round cannot hold {scheme.name}: Intel's auto_round stores W8A8/W4A4 as 16-bit fake weights "
            "(packing_format auto_round:fake); use llm_compressor (int-quantized)")


def scheme_fields(scheme: Scheme) -> dict:
    d = {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym, "data_type": scheme.data_type}
    if scheme.quantizes_activations:
        d.update({k: getattr(scheme, k) for k in ACT_FIELDS}, act_sym=True)
    else:
        d["act_bits"] = 16
    return d


def quantization_config(source, notes: dict) -> dict:
    schemes = {w.scheme for w in source.layers.values()}
    base = source.scheme if source.scheme in schemes else next(iter(schemes))
    if len({packing_format(s) for s in schemes}) > 1:
        raise ValueError("one auto_round checkpoint holds one packing format")
    extra = {}
    for name, w in source.layers.items():
        if w.scheme != base or not source.in_block(name):
            extra[name] = scheme_fields(w.scheme)
    for name in source.kept_in_blocks:
        extra[name] = {"bits": 16, "act_bits": 16}
    cfg = {
        **notes,
        **scheme_fields(base),
        "block_name_to_quantize": ",".join(source.block_prefixes),
        "quant_method": "auto-round",
        "packing_format": packing_format(base),
    }
    if base.data_type == "fp":
        cfg.update(fmt="e4m3", activation_scheme="static")
    if extra:
        cfg["extra_config"] = extra
    return cfg


def layer_parts(w) -> list[str]:
    """The names of :func:`layer_tensors`, known without reading the layer's codes."""
    data_key = "weight_packed" if w.scheme.bits == 4 else "weight"
    return [data_key, "weight_scale"] + [k for k in ("weight_global_scale", "input_global_scale", "input_scale") if k in w.extra]


def layer_tensors(w) -> dict[str, torch.Tensor]:
    rule = rule_name(w.scheme)
    data_key = layer_parts(w)[0]
    out = {data_key: w.q, "weight_scale": w.scales}
    if rule == "fp8":
        out["weight_scale"] = w.scales.float().reshape(-1)  # [N], Intel's shape
    for k in ("weight_global_scale", "input_global_scale", "input_scale"):
        if k in w.extra:
            out[k] = w.extra[k].float().reshape(1)
    return out


def write(source, folder: Path) -> None:
    state = dict(source.tensors)
    for name, w in source.layers.items():
        # Computed when its shard is written (hf_folder.write_weights): a streamed run never holds them all.
        parts = deferred_parts(lambda w=w: layer_tensors(w), layer_parts(w))
        state.update({f"{name}.{k}": take for k, take in parts.items()})
    qcfg = quantization_config(source, dict(source.metadata))
    write_hf_folder(source, folder, state, qcfg)
    write_json(folder / "quantization_config.json", qcfg)
