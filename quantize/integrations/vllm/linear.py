"""The linear methods of the vLLM plugin: the shared packed-parameter method
(quantize.integrations.packed_linear) with vLLM's parameter classes, and vLLM's Marlin kernel where it
applies (CUDA, sym 4/8-bit); the shared FP method (quantize.integrations.fp_linear) for MX / NV / FP8 layers."""

from __future__ import annotations

import dataclasses
import importlib

import torch
from vllm.model_executor import parameter as vllm_parameter
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method

from quantize.integrations.fp_linear import FPLinearMethod
from quantize.integrations.packed_linear import PackedLinearMethod
from quantize.scheme import Scheme


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def marlin_weight_type(scheme: Scheme, layout: str, act_dtype: torch.dtype):
    """vLLM's scalar type for Marlin's weights, or None where Marlin does not take the layer: symmetric
    4/8-bit weights in the GPTQ layout (vLLM's uint4b8/uint8b128: code minus 8 or 128, our sym zero point),
    half-precision activations. Shared by the linear layers and the MoE experts (integrations/vllm/moe.py)."""
    if not scheme.sym or scheme.bits not in (4, 8) or layout != "gptq" or act_dtype not in (torch.float16, torch.bfloat16):
        return None
    from vllm.scalar_type import scalar_types

    return scalar_types.uint4b8 if scheme.bits == 4 else scalar_types.uint8b128


def marlin_kernel(scheme: Scheme, layout: str, in_per_rank: int, out_per_rank: int, in_full: int, out_full: int,
                  act_dtype: torch.dtype, device: torch.device):
    """vLLM's Marlin kernel object for this layer, or None where it does not apply (CUDA and
    :func:`marlin_weight_type`)."""
    weight_type = marlin_weight_type(scheme, layout, act_dtype)
    if device.type != "cuda" or weight_type is None:
        return None
    kernel_modules = (
        "vllm.model_executor.kernels.linear.mixed_precision.marlin",
        "vllm.model_executor.layers.quantization.kernels.mixed_precision.marlin",  # vLLM before the kernels/ move
    )
    module = next((m for m in map(_try_import, kernel_modules) if m is not None), None)
    if module is None:
        return None
    MarlinLinearKernel, MPLinearLayerConfig = module.MarlinLinearKernel, module.MPLinearLayerConfig

    # vLLM up to 0.26 also asks whether the layer has an activation-order index (never, here).
    legacy = {"has_g_idx": False} if "has_g_idx" in {f.name for f in dataclasses.fields(MPLinearLayerConfig)} else {}
    config = MPLinearLayerConfig(
        full_weight_shape=(in_full, out_full), partition_weight_shape=(in_per_rank, out_per_rank),
        weight_type=weight_type,
        act_type=act_dtype, group_size=scheme.group_size, zero_points=False, **legacy,
    )
    ok, _ = MarlinLinearKernel.can_implement(config)
    if not ok:
        return None
    return MarlinLinearKernel(config, w_q_param_name="qweight", w_s_param_name="scales")


@register_weight_loader_v2_supported_method
class AutoRoundLinearMethod(PackedLinearMethod, LinearMethodBase):
    engine = "vLLM"
    parameter_classes = vllm_parameter

    def engine_marlin(self, layer: torch.nn.Module):
        spec = layer.quant_spec
        return marlin_kernel(self.scheme, self.layout, spec.in_features, spec.out_features, layer.input_size,
                             layer.output_size, layer.params_dtype, layer.qweight.device)


@register_weight_loader_v2_supported_method
class AutoRoundFPLinearMethod(FPLinearMethod, LinearMethodBase):
    engine = "vLLM"
    parameter_classes = vllm_parameter
