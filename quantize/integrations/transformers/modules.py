"""The module that replaces nn.Linear in a loaded auto_round checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from quantize.kernels import LinearSpec, kernel_state, select_kernel
from quantize.packing import packed_shapes



class QuantLinear(nn.Module):
    """Holds a layer's packed tensors under the checkpoint's names; computes through quantize.kernels."""

    def __init__(self, spec: LinearSpec, bias: bool, dtype: torch.dtype, kernel: str | None = None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.force_kernel = kernel
        shapes = packed_shapes(spec.layout, spec.bits, spec.in_features, spec.out_features, spec.groups)
        self.register_buffer("qweight", torch.empty(shapes["qweight"], dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(shapes["qzeros"], dtype=torch.int32))
        self.register_buffer("scales", torch.empty(shapes["scales"], dtype=torch.float16))
        self.register_buffer("bias", torch.empty(spec.out_features, dtype=dtype) if bias else None)
        self.kernel = None

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={s.in_features}, out={s.out_features}, bits={s.bits}, group_size={s.group_size}, sym={s.sym}, layout={s.layout}, kernel={getattr(self.kernel, 'name', None)}"

    def prepare(self) -> None:
        """Pick the kernel for this layer's device and let it derive its working tensors (registered as
        non-persistent buffers so they follow ``.to(device)`` and stay out of saved checkpoints)."""
        self.kernel = select_kernel(self.spec, self.qweight.device, self.force_kernel)
        for key, t in self.kernel.prepare(self.spec, self.qweight, self.qzeros, self.scales).items():
            self.register_buffer(f"k_{key}", t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(self.spec, kernel_state(self), x, self.bias)
