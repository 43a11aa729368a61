"""The linear method of the vLLM plugin: packed parameters that vLLM's weight loaders can shard, and
compute through vLLM's Marlin (CUDA, sym 4/8-bit) or quantize.kernels (everything else).

Shard arithmetic, for a layer that holds ``K`` inputs and ``N`` outputs of this rank:
- qweight of the gptq / native layouts is packed along K (``K*b/32`` rows), so a row-parallel shard is
  whole words only when ``K*b`` is a multiple of 32; awq packs qweight along N instead.
- qzeros are packed along N in every layout, so each output partition (q, k, v; gate, up; a column
  shard) must fill whole words: ``n*b`` a multiple of 32.
- scales and zeros have one row per group: a row-parallel shard must cover whole groups (``K`` a
  multiple of the group size). Per-channel layers (group_size -1) keep their single row on every rank.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
)

from quantize.checkpoint import ConfigError
from quantize.kernels import LinearSpec, kernel_state, select_kernel
from quantize.packing import PACKED_TENSORS
from quantize.scheme import Scheme


def check_partition(prefix: str, scheme: Scheme, layout: str, in_per_rank: int, in_full: int, out_parts: list[int]) -> None:
    """Refuse, naming the layer, a rank's slice that the packed tensors cannot be cut into."""
    b, g = scheme.bits, scheme.group_size
    split = f" (this rank holds {in_per_rank} of {in_full} inputs: try a smaller tensor-parallel size)" if in_per_rank != in_full else ""
    if layout != "awq" and (in_per_rank * b) % 32:
        raise ConfigError(f"layer {prefix}: {in_per_rank} inputs x {b} bits do not fill whole 32-bit words{split}")
    if g != -1 and in_per_rank % g:
        raise ConfigError(f"layer {prefix}: {in_per_rank} inputs are not a whole number of groups of {g}{split}")
    for n in out_parts:
        if (n * b) % 32:
            raise ConfigError(
                f"layer {prefix}: an output partition of {n} columns x {b} bits does not fill whole 32-bit words "
                f"(qzeros are packed along the outputs); needs a multiple of {32 // math.gcd(32, b)} columns per partition"
            )


def make_parameters(scheme: Scheme, layout: str, in_per_rank: int, out_per_rank: int, weight_loader) -> dict:
    """qweight / qzeros / scales of one rank, as vLLM parameters that know how to take their shard."""
    b = scheme.bits
    factor = Fraction(32, b)  # codes per word; vLLM's shard helpers divide sizes by it (exact: see check_partition)
    per_channel = scheme.group_size == -1
    groups = 1 if per_channel else in_per_rank // scheme.group_size
    if layout == "awq":
        qweight = PackedvLLMParameter(
            data=torch.empty(in_per_rank, out_per_rank * b // 32, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=weight_loader,
        )
    else:
        qweight = PackedvLLMParameter(
            data=torch.empty(in_per_rank * b // 32, out_per_rank, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=factor, weight_loader=weight_loader,
        )
    zeros = torch.empty(groups, out_per_rank * b // 32, dtype=torch.int32)
    scales = torch.empty(groups, out_per_rank, dtype=torch.float16)
    if per_channel:
        # One row shared by every input shard: replicated on each rank, split only along the outputs.
        qzeros = PackedColumnParameter(data=zeros, output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=weight_loader)
        scales_p = ChannelQuantScaleParameter(data=scales, output_dim=1, weight_loader=weight_loader)
    else:
        qzeros = PackedvLLMParameter(data=zeros, input_dim=0, output_dim=1, packed_dim=1, packed_factor=factor, weight_loader=weight_loader)
        scales_p = GroupQuantScaleParameter(data=scales, input_dim=0, output_dim=1, weight_loader=weight_loader)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales_p}


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def marlin_kernel(scheme: Scheme, layout: str, in_per_rank: int, out_per_rank: int, in_full: int, out_full: int,
                  act_dtype: torch.dtype, device: torch.device):
    """vLLM's Marlin kernel object for this layer, or None where it does not apply: symmetric 4/8-bit
    weights in the GPTQ layout (vLLM's uint4b8/uint8b128: code minus 8 or 128, our sym zero point), CUDA,
    half-precision activations."""
    if device.type != "cuda" or not scheme.sym or scheme.bits not in (4, 8) or layout != "gptq":
        return None
    if act_dtype not in (torch.float16, torch.bfloat16):
        return None
    kernel_modules = (
        "vllm.model_executor.kernels.linear.mixed_precision.marlin",
        "vllm.model_executor.layers.quantization.kernels.mixed_precision.marlin",  # vLLM before the kernels/ move
    )
    module = next((m for m in map(_try_import, kernel_modules) if m is not None), None)
    if module is None:
        return None
    MarlinLinearKernel, MPLinearLayerConfig = module.MarlinLinearKernel, module.MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    # vLLM up to 0.26 also asks whether the layer has an activation-order index (never, here).
    legacy = {"has_g_idx": False} if "has_g_idx" in {f.name for f in dataclasses.fields(MPLinearLayerConfig)} else {}
    config = MPLinearLayerConfig(
        full_weight_shape=(in_full, out_full), partition_weight_shape=(in_per_rank, out_per_rank),
        weight_type=scalar_types.uint4b8 if scheme.bits == 4 else scalar_types.uint8b128,
        act_type=act_dtype, group_size=scheme.group_size, zero_points=False, **legacy,
    )
    ok, _ = MarlinLinearKernel.can_implement(config)
    if not ok:
        return None
    return MarlinLinearKernel(config, w_q_param_name="qweight", w_s_param_name="scales")


@register_weight_loader_v2_supported_method
class AutoRoundLinearMethod(LinearMethodBase):
    """Packed parameters in the checkpoint's layout; after loading, the layer computes with vLLM's Marlin
    where it applies (CUDA, sym 4/8-bit) and with quantize.kernels otherwise. ``kernel`` forces a
    quantize.kernels entry (or "marlin")."""

    def __init__(self, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.force_kernel = kernel
        self.marlin = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        check_partition(self.prefix, self.scheme, self.layout, input_size_per_partition, input_size, output_partition_sizes)
        out_per_rank = sum(output_partition_sizes)
        params = make_parameters(
            self.scheme, self.layout, input_size_per_partition, out_per_rank, extra_weight_attrs.get("weight_loader")
        )
        for name, p in params.items():
            layer.register_parameter(name, p)
        layer.quant_spec = LinearSpec(
            self.scheme.bits, self.scheme.group_size, self.scheme.sym, self.layout, input_size_per_partition, out_per_rank,
            params_dtype,
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        spec = layer.quant_spec
        if self.force_kernel in (None, "marlin"):
            self.marlin = marlin_kernel(self.scheme, self.layout, spec.in_features, spec.out_features, layer.input_size,
                                        layer.output_size, layer.params_dtype, layer.qweight.device)
            if self.marlin is None and self.force_kernel == "marlin":
                raise ConfigError(f"layer {self.prefix}: vLLM's Marlin kernel cannot run {self.scheme.name} ({self.layout} layout) here")
        if self.marlin is not None:
            # Marlin wants scales in the activation dtype; the checkpoint stores float16.
            layer.scales.data = layer.scales.data.to(layer.params_dtype)
            self.marlin.process_weights_after_loading(layer)
            layer.quant_kernel = type(self.marlin)
            return
        # Plain tensors from here on (vLLM's parameter subclasses only matter while loading).
        for name in PACKED_TENSORS:
            data = getattr(layer, name).data
            delattr(layer, name)
            layer.register_buffer(name, data)
        layer.quant_kernel = select_kernel(spec, layer.qweight.device, self.force_kernel)
        for key, t in layer.quant_kernel.prepare(spec, layer.qweight, layer.qzeros, layer.scales).items():
            # A kernel's own form of a checkpoint tensor replaces it (vLLM never saves these layers back).
            layer.register_buffer(key if key in PACKED_TENSORS else f"k_{key}", t)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.marlin is not None:
            return self.marlin.apply_weights(layer, x, bias)
        return layer.quant_kernel.apply(layer.quant_spec, kernel_state(layer), x, bias)
