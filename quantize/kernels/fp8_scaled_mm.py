"""FP8_STATIC layers on FP8 tensor cores: ``torch._scaled_mm`` (cuBLASLt; PyTorch core, no dependency).

The layer's checkpoint holds ``weight`` float8_e4m3fn ``[N, K]``, a float32 ``weight_scale`` per output
channel and a calibrated float32 ``input_scale`` (quantize.fp_layout). The kernel quantizes the input to
FP8 codes under that scale exactly as the tuned model does (quantize.numerics_fp8.codes), multiplies codes
by codes with float32 accumulation, and applies both scales to the float32 sums ("row-wise" scaling:
one per input row, one per output channel) before rounding to bf16 once. The emulation
(quantize.kernels.fp_emulate) rounds the dequantized weight and input to 16 bits first, so the two agree
to 16-bit rounding, and this kernel is the closer of the two to exact arithmetic (tests/test_fp8_scaled_mm.py).

The weight stays FP8 (half the bytes of the emulation's 16-bit copy). Constraints of torch's CUDA op:
compute capability 8.9 or newer (Ada, Hopper, Blackwell), row-wise scales with bf16 output only (fp16
and float32 models keep the emulation), K and N multiples of 16. torch also runs the op on the CPU,
which is how CI checks the arithmetic; it is not picked there (no FP8 units).
"""

from __future__ import annotations

import torch

from quantize import fp_layout, weight_rules
from quantize.kernels.dispatch import FPLinearSpec, register_kernel
from quantize.numerics_fp8 import codes

MIN_CAPABILITY = (8, 9)


@register_kernel("fp8_scaled_mm")
class FP8ScaledMMKernel:
    priority = 20
    spec_type = FPLinearSpec

    @staticmethod
    def unsupported(spec: FPLinearSpec, device: torch.device) -> str | None:
        s = spec.scheme
        if weight_rules.rule_name(s) != "fp8" or weight_rules.fp8_layout(s) != "channel" or not s.static_activations:
            return "takes FP8 weights per channel with static FP8 inputs (FP8_STATIC)"
        if spec.act_dtype != torch.bfloat16:
            return f"row-wise scaled products give bf16 only; activations are {spec.act_dtype}"
        if spec.in_features % 16 or spec.out_features % 16:
            return f"needs in and out features divisible by 16, got {spec.in_features} x {spec.out_features}"
        if device.type != "cuda":
            return "needs CUDA"
        if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            return f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (FP8 tensor cores)"
        return None

    @staticmethod
    def prepare(spec: FPLinearSpec, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "weight": torch.cat([p["weight"] for p in parts]),  # [N, K]; .t() is the column-major operand
            "weight_scale": torch.cat([p["weight_scale"].float().reshape(-1) for p in parts]).reshape(1, -1),
            **fp_layout.fused_input_scalars(parts),
        }

    @staticmethod
    def apply(spec: FPLinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = state["input_scale"]
        out = torch._scaled_mm(codes(rows, scale), state["weight"].t(), scale_a=scale.expand(rows.shape[0], 1).contiguous(),
                               scale_b=state["weight_scale"], out_dtype=torch.bfloat16)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
