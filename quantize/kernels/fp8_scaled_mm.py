"""FP8_STATIC layers on FP8 tensor cores, the weight kept in FP8 (half the bytes of the emulation's copy).

The layer's checkpoint holds ``weight`` float8_e4m3fn ``[N, K]``, a float32 ``weight_scale`` per output
channel and a calibrated float32 ``input_scale`` (quantize.fp_layout). The kernel rounds the input to FP8
codes under that scale exactly as the tuned model does (quantize.numerics_fp8.codes), multiplies codes by
codes with float32 accumulation, and applies both scales to the float32 sums before rounding to bf16
once. The emulation (quantize.kernels.fp_emulate) rounds the dequantized weight and input to 16 bits
first, so the two agree to 16-bit rounding, and this kernel is the closer of the two to exact arithmetic
(tests/test_fp8_scaled_mm.py).

The input is rounded in one Triton pass (quantize.kernels.fp8_triton), then ``torch._scaled_mm``
multiplies (cuBLASLt, "row-wise" scales: one per input row, one per output channel). Inside vLLM the
table prefers vLLM's own CUTLASS kernels (quantize.kernels.vllm_fp8), faster at decode sizes. Constraints: CUDA compute capability 8.9
or newer (Ada, Hopper, Blackwell), bf16 activations (fp16 and float32 models keep the emulation), K and
N multiples of 16. torch (2.13) runs ``_scaled_mm`` on the CPU too and Triton's interpreter runs the
Triton kernel there, which is how CI checks the arithmetic; the kernel is not picked on a CPU (no FP8 units).
"""

from __future__ import annotations

import torch

from quantize import fp_layout, weight_rules
from quantize.kernels.dispatch import FPLinearSpec, register_kernel
from quantize.numerics_fp8 import codes

try:
    from quantize.kernels import fp8_triton
except ImportError:  # CPU-only installs without Triton; CUDA builds of torch bring it
    fp8_triton = None

MIN_CAPABILITY = (8, 9)


def fp8_static_unsupported(spec: FPLinearSpec, device: torch.device) -> str | None:
    """Why an FP8 tensor-core kernel cannot take this layer (scheme, shape, GPU), or None; shared with
    quantize.kernels.vllm_fp8."""
    s = spec.scheme
    if weight_rules.rule_name(s) != "fp8" or weight_rules.fp8_layout(s) != "channel" or not s.static_activations:
        return "takes FP8 weights per channel with static FP8 inputs (FP8_STATIC)"
    if spec.in_features % 16 or spec.out_features % 16:
        return f"needs in and out features divisible by 16, got {spec.in_features} x {spec.out_features}"
    if device.type != "cuda":
        return "needs CUDA"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (FP8 tensor cores)"
    return None


@register_kernel("fp8_scaled_mm")
class FP8ScaledMMKernel:
    priority = 20
    spec_type = FPLinearSpec

    @staticmethod
    def unsupported(spec: FPLinearSpec, device: torch.device) -> str | None:
        if spec.act_dtype != torch.bfloat16:
            return f"row-wise scaled products give bf16 only; activations are {spec.act_dtype}"
        why = fp8_static_unsupported(spec, device)
        if why is None and fp8_triton is None:
            return "needs Triton (pip install triton)"
        return why

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
        if rows.is_cuda:
            # the custom op only where torch.compile traces (as quantize.kernels.triton_gemm does)
            matmul = fp8_static_mm_op if torch.compiler.is_compiling() else fp8_static_mm
            out = matmul(rows.contiguous(), state["weight"], state["weight_scale"], state["input_scale"])
        else:
            row_scales = state["input_scale"].expand(rows.shape[0], 1).contiguous()
            out = _scaled_mm(codes(rows, state["input_scale"]), row_scales, state["weight"], state["weight_scale"])
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def _scaled_mm(q: torch.Tensor, row_scales: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    return torch._scaled_mm(q, weight.t(), scale_a=row_scales, scale_b=weight_scale, out_dtype=torch.bfloat16)


def fp8_static_mm(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """CUDA: the input rounded in one Triton pass, then cuBLASLt's FP8 GEMM."""
    return _scaled_mm(*fp8_triton.fp8_codes(rows, input_scale), weight, weight_scale)


@torch.library.custom_op("quantize::fp8_static_mm", mutates_args=())
def fp8_static_mm_op(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """:func:`fp8_static_mm` as one opaque operator for torch.compile and CUDA graphs."""
    return fp8_static_mm(rows, weight, weight_scale, input_scale)


@fp8_static_mm_op.register_fake
def _(rows, weight, weight_scale, input_scale):
    return rows.new_empty(rows.shape[0], weight.shape[0], dtype=torch.bfloat16)
