"""The linear method the vLLM and SGLang plugins share for floating-point auto_round layers (MXFP4, MXFP8,
NVFP4 and their A16 variants, FP8_STATIC; the layout: quantize.fp_layout).

Compute comes from quantize.kernels, as for the transformers integration: FP8_STATIC on FP8 tensor cores
where the GPU has them (fp8_scaled_mm), everything else through the exact emulation (fp_emulate: the
weight dequantized once, the input fake-quantized as the serving kernel quantizes it), the tuned model's
own numbers at 16-bit speed and memory. The engines' compressed-tensors methods serve the same models
natively when written with ``--format llm_compressor``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from quantize.checkpoint import ConfigError
from quantize.fp_layout import SCALARS, checkpoint_tensors, split_parts
from quantize.kernels import FPLinearSpec, kernel_state, select_kernel
from quantize.scheme import Scheme


class FPLinearMethod:
    """The linear method both engines get for FP auto_round layers, mixed into each engine's
    ``LinearMethodBase`` (like quantize.integrations.packed_linear.PackedLinearMethod): the checkpoint's
    tensors as the engine's parameters (which cut their tensor-parallel shard), then the layer's kernel."""

    engine = ""
    parameter_classes: ModuleType

    def __init__(self, scheme: Scheme, prefix: str, kernel: str | None = None):
        self.scheme = scheme
        self.prefix = prefix
        self.kernel = kernel  # the checkpoint config's ``kernel``: forced where it computes FP layers

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
        layer.fp_parts, layer.fp_tensors, layer.fp_in = parts, tuple(tensors), k

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Hand each fused part's tensors (its own scalars) to the layer's kernel; keep only what it derives."""
        loaded = {n: getattr(layer, n).data for n in layer.fp_tensors}
        parts = split_parts(loaded, layer.fp_parts)
        spec = FPLinearSpec(self.scheme, layer.fp_in, sum(layer.fp_parts), layer.params_dtype)
        layer.quant_kernel = select_kernel(spec, loaded["weight_scale"].device, self.kernel)
        state = layer.quant_kernel.prepare(spec, parts)
        for n in layer.fp_tensors:
            delattr(layer, n)
        for key, t in state.items():
            layer.register_buffer(f"k_{key}", t, persistent=False)
        layer.fp_spec = spec

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.quant_kernel.apply(layer.fp_spec, kernel_state(layer), x, bias)
