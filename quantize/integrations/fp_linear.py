"""Floating-point auto_round checkpoints (MXFP4, MXFP8, NVFP4 and their A16 variants, FP8_STATIC), in the
layout quantize.export.auto_round_fp and Intel AutoRound write: the tensors one layer holds, their exact
dequantization, and the linear method the vLLM and SGLang plugins share for them.

What every engine computes here is the exact emulation the transformers integration runs: the weight is
dequantized once after loading (quantize.weight_rules) into the activation dtype, and the input is
fake-quantized as the serving kernel would quantize it (quantize.act_quant: MX dynamic groups, NVFP4 under
the stored ``input_global_scale``, FP8 under the stored ``input_scale``). So the checkpoint is served with
the tuned model's own numbers on any device, at 16-bit speed and memory: native FP4/FP8 kernels are the
engines' compressed-tensors methods, which serve the same model written with ``--format llm_compressor``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from quantize import act_quant, weight_rules
from quantize.checkpoint import ConfigError
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


class FPLinearMethod:
    """The linear method both engines get for FP auto_round layers, mixed into each engine's
    ``LinearMethodBase`` (like quantize.integrations.packed_linear.PackedLinearMethod): the checkpoint's
    tensors as the engine's parameters (which cut their tensor-parallel shard), then the emulation above."""

    engine = ""
    parameter_classes: ModuleType

    def __init__(self, scheme: Scheme, prefix: str):
        self.scheme = scheme
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        s, k, parts = self.scheme, input_size_per_partition, list(output_partition_sizes)
        split = f" (this rank holds {k} of {input_size} inputs: try a smaller tensor-parallel size)" if k != input_size else ""
        if (s.group_size > 0 and k % s.group_size) or (s.bits == 4 and k % 2):
            raise ConfigError(f"layer {self.prefix}: {k} inputs are not a whole number of {s.name} groups of "
                              f"{max(s.group_size, 2)}{split}")
        classes, loader = self.parameter_classes, extra_weight_attrs.get("weight_loader")
        tensors = checkpoint_tensors(s, k, sum(parts))
        for name, (shape, dtype) in tensors.items():
            data = torch.empty(shape, dtype=dtype)
            if name in SCALARS:  # one scalar per fused part (q, k, v), each loaded into its slot
                p = classes.PerTensorScaleParameter(data=torch.empty(len(parts), dtype=dtype), weight_loader=loader)
            elif len(shape) == 1:  # FP8 per-channel scales
                p = classes.ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
            elif name == "weight_scale":
                p = classes.GroupQuantScaleParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            else:  # weight [N, K] or weight_packed [N, K/2]: cut along either dimension as stored
                p = classes.ModelWeightParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            layer.register_parameter(name, p)
        layer.fp_parts, layer.fp_tensors = parts, tuple(tensors)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Dequantize each fused part with its own scalars; keep only the 16-bit weight and the input rule."""
        loaded = {n: getattr(layer, n).data for n in layer.fp_tensors}
        weights, start = [], 0
        for i, n in enumerate(layer.fp_parts):
            part = {k: (t[i : i + 1] if k in SCALARS else t[start : start + n]) for k, t in loaded.items()}
            weights.append(dequantize(self.scheme, part, layer.params_dtype))
            start += n
        # Fused parts read one input: the widest range any part calibrated (they see the same activations).
        merged = {k: (loaded[k].min() if k == "input_global_scale" else loaded[k].max()).reshape(1)
                  for k in ("input_global_scale", "input_scale") if k in loaded}
        for n in layer.fp_tensors:
            delattr(layer, n)
        layer.register_buffer("k_weight", torch.cat(weights), persistent=False)
        layer.fp_input = input_quantizer(self.scheme, merged)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.fp_input is not None:
            x = layer.fp_input(x)
        return F.linear(x, layer.k_weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
