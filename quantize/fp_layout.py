"""The auto_round layout of floating-point and activation-quantized layers (MXFP4, MXFP8, NVFP4 and their
A16 variants, FP8_STATIC), as quantize.export.auto_round_fp and Intel AutoRound write it: the tensors one
layer holds, their exact dequantization, and the input quantization a served layer applies. Shared by the
kernels that compute such layers (quantize.kernels.fp_emulate, fp8_scaled_mm), the engine adapters and
convert."""

from __future__ import annotations

import torch

from quantize import act_quant, weight_rules
from quantize.scheme import Scheme

# Per-layer float32 scalars (one per fused part in an engine's merged layer).
SCALARS = ("weight_global_scale", "input_global_scale", "input_scale")


def has_layout(scheme: Scheme) -> bool:
    """Whether auto_round checkpoints of ``scheme`` hold FP tensors in this layout (the rest are refused)."""
    rule = weight_rules.rule_name(scheme)
    return rule in ("mx_fp", "nv_fp") or (rule == "fp8" and weight_rules.fp8_layout(scheme) == "channel")


def checkpoint_tensors(scheme: Scheme, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of one layer's tensors in the auto_round FP layout."""
    n, k = out_features, in_features
    rule = weight_rules.rule_name(scheme)
    t = {}
    if scheme.bits == 4:
        t["weight_packed"] = ((n, k // 2), torch.uint8)
    else:
        t["weight"] = ((n, k), torch.float8_e4m3fn)
    if rule == "mx_fp":
        t["weight_scale"] = ((n, k // scheme.group_size), torch.uint8)
    elif rule == "nv_fp":
        t["weight_scale"] = ((n, k // scheme.group_size), torch.float8_e4m3fn)
        t["weight_global_scale"] = ((1,), torch.float32)
        if scheme.quantizes_activations:
            t["input_global_scale"] = ((1,), torch.float32)
    elif rule == "fp8":
        t["weight_scale"] = ((n,), torch.float32)
        if scheme.static_activations:
            t["input_scale"] = ((1,), torch.float32)
    else:
        raise ValueError(f"{scheme.name} has no auto_round FP layout")
    return t


def dequantize(scheme: Scheme, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The exact weight ``[N, K]`` of one layer's checkpoint tensors, in ``dtype``."""
    data = tensors["weight_packed"] if scheme.bits == 4 else tensors["weight"]
    scales = tensors["weight_scale"]
    if weight_rules.rule_name(scheme) == "fp8":
        scales = scales.float().reshape(-1, 1)
    extra = {k: tensors[k].float() for k in SCALARS if k in tensors}
    return weight_rules.dequantize(data, scales, torch.zeros(0, dtype=torch.uint8), extra, scheme, dtype)


def input_quantizer(scheme: Scheme, tensors: dict[str, torch.Tensor]):
    """The input fake-quantization the served layer applies (None for weight-only schemes)."""
    return act_quant.quantizer(scheme, {k: tensors[k].float() for k in SCALARS if k in tensors})


def split_parts(tensors: dict[str, torch.Tensor], rows: list[int]) -> list[dict[str, torch.Tensor]]:
    """An engine's fused layer (q/k/v, gate/up) as the checkpoint's layers it merges: each part's rows of
    the 2-D tensors and its own slot of every per-part scalar (one slot per part, in order)."""
    parts, start = [], 0
    for i, n in enumerate(rows):
        parts.append({k: (t.reshape(-1)[i : i + 1] if k in SCALARS else t[start : start + n]) for k, t in tensors.items()})
        start += n
    return parts


def fused_input_scalars(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The input scalars of an engine's fused layer (q/k/v, gate/up), one float32 value each: its parts read
    the same input, so it takes the widest range any part calibrated (the largest FP8 ``input_scale``, the
    smallest NVFP4 ``input_global_scale``)."""
    merged = {}
    for key, pick in (("input_scale", torch.max), ("input_global_scale", torch.min)):
        if key in parts[0]:
            merged[key] = pick(torch.cat([p[key].float().reshape(-1) for p in parts])).reshape(1)
    return merged
