"""PyTorch core's CPU int4 GEMM (``aten._weight_int4pack_mm_for_cpu``) for 2-, 3- and 4-bit layers of
bfloat16 models: decode on the CPU without dequantizing the weight on every call.

The op computes ``w = (q - 8) * scale + zero_f`` per group from 4-bit codes, the formula of the CUDA
tinygemm (kernels/tinygemm.py has the exact mapping ``scale = s``, ``zero_f = s * (8 - z)`` and its error
bound). A 2- or 3-bit code becomes a 4-bit code centred on 8: ``q + 8 - 2**(b-1)`` (zero point moved
alike), so ``q - 8`` and ``8 - z`` stay as small as the width allows and with them the bf16 rounding of
``zero_f`` (centred, a 2-bit layer's outputs are within 0.5% of float32; at codes 0-3 they were 2% off).
Every width up to 4 runs at 4 bits of memory per weight.

The op reads the whole weight once per activation row (time grows with M; 2-core AMX Xeon, one thread,
4096x4096: 2.1 ms at M = 1 against 5.0 ms for bf16 ``F.linear``, 15 ms against 5.4 ms at M = 16), so
only calls of up to ``MAX_M`` rows take it: token-by-token decode. Longer inputs (prefill) dequantize the
weight once for the call (the portable path, unpacking the checkpoint's tensors). Activations other than bfloat16 run the op's slow path
(10-40x slower), so the kernel is picked only for bfloat16 models.
"""

from __future__ import annotations

import torch

from quantize.kernels.dispatch import LinearSpec, register_kernel
from quantize.kernels.tinygemm import inner_k_tiles, scales_and_zeros, shape_unsupported
from quantize.kernels.torch_ref import TorchKernel
from quantize.packing import PackedLinear, unpack

MAX_M = 4


@register_kernel("tinygemm_cpu")
class TinygemmCpuKernel:
    priority = 4  # above the portable path; below vLLM's CPU kernel (5) where a vLLM process has it

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "CPU only"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no aten._weight_int4pack_mm_for_cpu"
        if spec.bits > 4:
            return f"up to 4-bit weights, not {spec.bits}-bit"
        if spec.act_dtype != torch.bfloat16:
            return f"takes bfloat16 activations (the op's other paths are 10-40x slower), not {spec.act_dtype}"
        return shape_unsupported(spec, n_multiple=16)

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        q, scales_ng, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), spec.bits, spec.in_features, spec.out_features)
        shift = 8 - 2 ** (spec.bits - 1)
        codes = (q.to(torch.int32) + shift).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles(spec.in_features))
        return {"tg_weight": packed, "tg_sz": scales_and_zeros(scales_ng, zeros.to(torch.int32) + shift)}

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.dtype != torch.bfloat16 or x2.shape[0] > MAX_M:
            # Unpacked per call from the checkpoint's tensors: keeping the portable path's one-byte codes
            # as well would double the layer's memory for the rarer long calls.
            ckpt = PackedLinear(state["qweight"], state["qzeros"], state["scales"])
            q, _, zeros = unpack(spec.layout, ckpt, spec.bits, spec.in_features, spec.out_features)
            return TorchKernel.apply(spec, {**state, "q": q, "zeros_nk": zeros}, x, bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), state["tg_weight"], spec.group_size, state["tg_sz"])
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], spec.out_features)
