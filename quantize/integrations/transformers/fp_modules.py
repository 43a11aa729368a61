"""The module that replaces nn.Linear for a layer of an FP or activation-quantized auto_round checkpoint
(MXFP4, MXFP8, NVFP4 and their A16 variants, FP8_STATIC: quantize.export.auto_round_fp), ours or Intel's.

On the CPU it emulates the served computation exactly (quantize.integrations.fp_linear): the weight
dequantized once after loading, the input fake-quantized as the serving kernel quantizes it. This is
exactly what the tuned model in memory computes, so logits match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantize.integrations.fp_linear import checkpoint_tensors, dequantize, input_quantizer
from quantize.scheme import Scheme


class FPQuantLinear(nn.Module):
    def __init__(self, scheme: Scheme, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = in_features, out_features
        self.tensor_names = tuple(checkpoint_tensors(scheme, in_features, out_features))
        for name, (shape, dt) in checkpoint_tensors(scheme, in_features, out_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.dtype = dtype
        self.act = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}"

    def prepare(self) -> None:
        """Dequantize the weight once (exact, in the model's dtype) and set up the input quantization."""
        tensors = {name: self._buffers[name] for name in self.tensor_names}
        self.register_buffer("k_weight", dequantize(self.scheme, tensors, self.dtype), persistent=False)
        self.act = input_quantizer(self.scheme, tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.k_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
