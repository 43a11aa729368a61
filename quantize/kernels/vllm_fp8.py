"""FP8_STATIC layers on vLLM's own FP8 kernels (CUTLASS), offered where vLLM is loaded on a CUDA GPU.

Inside vLLM (the plugin) these are the kernels vLLM runs for its own FP8 checkpoints: ``scaled_fp8_quant``
rounds the input under the static scale, ``cutlass_scaled_mm`` multiplies FP8 codes with float32
accumulation and applies the per-tensor input scale and the per-channel weight scale to the sums, then
adds the bias, in one kernel. CUTLASS has small-M configurations that cuBLASLt's row-wise FP8 GEMM
(quantize.kernels.fp8_scaled_mm) lacks, which is where decode spends its time. Same tensors and
constraints as that kernel (it prepares them), plus fp16 activations.
"""

from __future__ import annotations

import sys

import torch

from quantize.kernels.dispatch import FPLinearSpec, register_kernel
from quantize.kernels.fp8_scaled_mm import FP8ScaledMMKernel, fp8_static_unsupported


def _ops():
    return sys.modules.get("vllm._custom_ops")


@register_kernel("vllm_fp8")
class VllmFP8Kernel:
    priority = 30
    spec_type = FPLinearSpec

    @staticmethod
    def unsupported(spec: FPLinearSpec, device: torch.device) -> str | None:
        why = fp8_static_unsupported(spec, device)
        if why:
            return why
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return f"takes bf16 or fp16 activations, not {spec.act_dtype}"
        if _ops() is None:
            return "vLLM is not loaded in this process"
        major, minor = torch.cuda.get_device_capability(device)
        if not _ops().cutlass_scaled_mm_supports_fp8(major * 10 + minor):
            return "this vLLM build has no CUTLASS FP8 GEMM for this GPU"
        return None

    prepare = staticmethod(FP8ScaledMMKernel.prepare)

    @staticmethod
    def apply(spec: FPLinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ops = _ops()
        rows = x.reshape(-1, x.shape[-1])
        q, _ = ops.scaled_fp8_quant(rows, state["input_scale"].reshape(1))
        out = ops.cutlass_scaled_mm(q, state["weight"].t(), scale_a=state["input_scale"].reshape(1),
                                    scale_b=state["weight_scale"], out_dtype=x.dtype,
                                    bias=None if bias is None else bias.to(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])
