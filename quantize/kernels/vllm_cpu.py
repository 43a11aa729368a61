"""vLLM's CPU kernel for 4-bit weights (``cpu_gemm_wna16``), offered where vLLM is already loaded.

It is only a candidate inside a process that imported vLLM (its import costs seconds, so plain
transformers users never pay for it), and only where vLLM's CPU build has it: its AVX-512 and generic
builds do, its AVX2 build does not. It needs K and N multiples of 32 and an even group size; every
packing layout is converted once, at load, to the kernel's own blocked layout. It takes bfloat16 and
float16 activations only (float32 raises "not implemented for 'Float'"), so float32 layers stay on the
portable path. Where it runs it is the faster one: 2-27x over the portable path's dequantize-and-matmul
on a 2-core AVX-512/AMX Xeon (bf16 and fp16, M = 1-128, 1536x512 to 11008x4096).
"""

from __future__ import annotations

import logging
import sys

import torch

from quantize.kernels.dispatch import LinearSpec, register_kernel
from quantize.kernels.torch_ref import TorchKernel
from quantize.packing import PackedLinear, pack_bits, unpack

log = logging.getLogger("quantize.kernels")

_BLOCK_N = 16  # the kernel reads 16 output channels of one K row as one contiguous block
DTYPES = (torch.bfloat16, torch.float16)  # the activation dtypes the op implements


def _ops():
    return sys.modules.get("vllm._custom_ops")


@register_kernel("vllm_cpu")
class VllmCpuKernel:
    priority = 5

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "runs on the CPU only"
        if _ops() is None:
            return "vLLM is not loaded in this process"
        if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return "vLLM's CPU build for this processor has no cpu_gemm_wna16 (its AVX2 build lacks it)"
        if spec.act_dtype not in DTYPES:
            return f"takes bfloat16/float16 activations only, not {spec.act_dtype}"
        if spec.bits != 4:
            return f"4-bit weights only, not {spec.bits}-bit"
        if spec.in_features % 32 or spec.out_features % 32:
            return f"in_features and out_features must be multiples of 32 (got {spec.in_features}, {spec.out_features})"
        if spec.group_size != -1 and spec.group_size % 2:
            return f"needs an even group size, not {spec.group_size}"
        return None

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        q, scales_ng, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), 4, spec.in_features, spec.out_features)
        k, n = spec.in_features, spec.out_features
        # [K, N] packed along N, then 16 output channels of every K row made contiguous.
        words = pack_bits(q.t().contiguous(), 4)
        blocked = words.view(k, n // _BLOCK_N, _BLOCK_N // 8).permute(1, 0, 2).reshape(n // _BLOCK_N, k * _BLOCK_N // 8)
        # Own names: callers merge these over the checkpoint's qweight/qzeros/scales.
        state = {"cpu_qweight": blocked.contiguous(), "cpu_scales": scales_ng.t().contiguous().float()}
        # Symmetric layers have zero 8 everywhere: the kernel's implicit "minus 8" (uint4b8) covers them.
        if not torch.all(zeros == 8):
            state["cpu_qzeros"] = pack_bits(zeros.t().contiguous(), 4)
        return state

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype not in DTYPES:
            # The model was cast after loading (e.g. ``.float()``): correct, slow (unpacks on every call).
            if spec not in _warned:
                _warned.add(spec)
                log.warning("vllm_cpu kernel got %s activations; computing on the portable path", x.dtype)
            return TorchKernel.apply(spec, {**state, **TorchKernel.prepare(spec, state["qweight"], state["qzeros"], state["scales"])}, x, bias)
        return _ops().cpu_gemm_wna16(
            input=x.contiguous(), q_weight=state["cpu_qweight"], scales=state["cpu_scales"].to(x.dtype), zeros=state.get("cpu_qzeros"),
            bias=None if bias is None else bias.to(x.dtype), pack_factor=8, isa_hint=_isa(x.dtype),
        )


_warned: set[LinearSpec] = set()
# Asked once, at import: vLLM compiles the model on the CPU, and torch.compile refuses to trace this probe.
# Linux lets a process run AMX instructions only after asking for the tile state (arch_prctl); oneDNN asks
# when it first needs it, vLLM's kernel does not, so a process whose first AMX instruction is this op dies
# of SIGILL (seen on a 2-core AMX Xeon): ask here, once.
_AMX = torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()


def _isa(dtype: torch.dtype) -> str:
    return "amx" if dtype == torch.bfloat16 and _AMX else "vec"
