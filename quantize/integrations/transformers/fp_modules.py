"""The module that replaces nn.Linear for a layer of an FP or activation-quantized auto_round checkpoint
(MXFP4, MXFP8, NVFP4 and their A16 variants, FP8_STATIC: quantize.fp_layout), ours or Intel's.

It holds the checkpoint's tensors under their names and computes through quantize.kernels: FP8_STATIC on
FP8 tensor cores where the GPU has them (bf16 models), everything else through the exact emulation (the
weight dequantized once after loading, the input fake-quantized as the serving kernel quantizes it: what
the tuned model in memory computes, so logits match).
"""

from __future__ import annotations

import torch
from torch import nn

from quantize.fp_layout import checkpoint_tensors
from quantize.kernels import FPLinearSpec, kernel_state, select_kernel
from quantize.scheme import Scheme


class FPQuantLinear(nn.Module):
    def __init__(self, scheme: Scheme, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 kernel: str | None = None):
        super().__init__()
        self.spec = FPLinearSpec(scheme, in_features, out_features, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.force_kernel = kernel
        self.tensor_names = tuple(checkpoint_tensors(scheme, in_features, out_features))
        for name, (shape, dt) in checkpoint_tensors(scheme, in_features, out_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.kernel = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.spec.scheme.name}, kernel={getattr(self.kernel, 'name', None)}"

    def prepare(self) -> None:
        """Pick the kernel for this layer's device and let it derive its working tensors (non-persistent
        buffers: they follow ``.to(device)`` and stay out of saved checkpoints)."""
        self.kernel = select_kernel(self.spec, self._buffers[self.tensor_names[0]].device, self.force_kernel)
        parts = [{name: self._buffers[name] for name in self.tensor_names}]
        for key, t in self.kernel.prepare(self.spec, parts).items():
            self.register_buffer(f"k_{key}", t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(self.spec, kernel_state(self), x, self.bias)
