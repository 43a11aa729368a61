"""The portable path for FP and activation-quantized layers (quantize.fp_layout), and the reference the
native FP kernels are tested against: the weight dequantized once, exactly, into the activation dtype;
the input fake-quantized on every call as the serving kernel quantizes it. Runs anywhere torch runs, at
16-bit speed and memory: what the tuned model in memory computes, so logits match it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantize import fp_layout
from quantize.kernels.dispatch import FPLinearSpec, register_kernel


@register_kernel("fp_emulate")
class FPEmulateKernel:
    priority = 0
    spec_type = FPLinearSpec

    @staticmethod
    def unsupported(spec: FPLinearSpec, device: torch.device) -> str | None:
        return None

    @staticmethod
    def prepare(spec: FPLinearSpec, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # Each fused part dequantizes under its own scalars (NVFP4 parts have their own global scale).
        dtype = spec.act_dtype or torch.float32
        weight = torch.cat([fp_layout.dequantize(spec.scheme, part, dtype) for part in parts])
        return {"weight": weight, **fp_layout.fused_input_scalars(parts)}

    @staticmethod
    def apply(spec: FPLinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        act = fp_layout.input_quantizer(spec.scheme, state)
        if act is not None:
            x = act(x)
        return F.linear(x, state["weight"].to(x.dtype), None if bias is None else bias.to(x.dtype))
