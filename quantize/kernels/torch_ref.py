"""The portable path, and the reference every other kernel is tested against: unpack, dequantize,
matmul. Runs anywhere torch runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantize.kernels.dispatch import LinearSpec, register_kernel
from quantize.numerics import dequantize
from quantize.packing import PackedLinear, unpack


@register_kernel("torch")
class TorchKernel:
    priority = 0

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        return None

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        # Unpacked once: one byte per weight instead of re-running the bit shifts on every call.
        q, _, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), spec.bits, spec.in_features, spec.out_features)
        return {"q": q, "zeros_nk": zeros}

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize(state["q"], state["scales"].t(), state["zeros_nk"], x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
