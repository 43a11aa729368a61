"""PyTorch core's own int4 weight-only GEMM ("tinygemm": ``aten._weight_int4pack_mm``), for 4-bit layers.

Present in every CUDA build of torch (no dependency), for sm80 and newer. It computes with

    w = (q - 8) * scale + zero_f        (per group: bf16 ``scale`` and ``zero_f``, packed [G, N, 2])

while our checkpoints hold ``w = s * (q - z)`` with float16 ``s`` and integer ``z``. In real arithmetic
``scale = s`` and ``zero_f = s * (8 - z)`` are exact (``8 - z`` is an integer in [-7, 8], so the product
is exact in float32 and rounded to bf16 once; sym layers have ``z = 8`` and ``zero_f = 0`` exactly).
The only loss is bf16's 8-bit significand (unit roundoff ``u = 2**-8``) on ``s`` and ``zero_f``, plus
the kernel's own bf16 dequantization: per weight

    |w_tinygemm - w| <= 3 * u * |s| * (|q - 8| + |8 - z|)

(at most 3/16 of a quantization step for asym, 3/32 for sym); tests/test_tinygemm.py checks this bound
weight by weight and the products to 1e-2 relative (Frobenius) of the float32 reference.

Constraints of torch 2.11's CUDA op (aten/src/ATen/native/cuda/int4mm.cu): bf16 activations only
(``A.dtype() == kBFloat16``), contiguous; group sizes 32/64/128/256; the weight comes as uint8
``[N, K/2]`` (two codes a byte, the even k in the high nibble) and ``_convert_weight_to_int4pack``
turns it into int32 ``[N/8, K/(16*inner_k_tiles), 32, inner_k_tiles/2]``; K a multiple of
``16 * inner_k_tiles`` (8 where K allows, the fastest), N a multiple of 8 (the op rounds N up to 8).
The CPU op (``_convert_weight_to_int4pack_for_cpu`` takes int32 codes ``[N, K]``; ``..._mm_for_cpu``)
has the same formula but its own layout; it runs :class:`TinygemmKernel` on the CPU in tests.

Dispatch by M in :func:`mm_by_m` (under torch.compile wrapped as the ``quantize::int4_mm_by_m`` op, so
that one trace serves every M): tinygemm for bf16 and ``M <= MAX_M`` (it tiles M
by 16 and re-reads the weight per M tile, so it loses to cuBLAS on dequantized weights at large M);
everything else (larger M, float16/float32 activations) goes to the Triton path, whose tensors
``prepare`` also makes. No host synchronisation and nothing allocated but the outputs: CUDA-graph safe.
"""

from __future__ import annotations

import torch

from quantize.kernels.dispatch import KERNELS, LinearSpec, register_kernel
from quantize.packing import PackedLinear, unpack

GROUP_SIZES = (32, 64, 128, 256)
# Largest M (rows of the flattened activation) sent to tinygemm. H100, per call inside CUDA graphs
# (benchmarks/results/kernels_h100_w4_marlin_graph.json, W4 g128 on the four 7B/8B/70B shapes): tinygemm
# 2.1-2.4x bf16 at M = 1-2, 1.7-1.9x at M = 4, 1.1-1.3x at M = 8 (Triton 1.10x: level or behind), and
# 0.65-0.82x at M = 16 where Triton holds 1.03-1.07x. So M <= 8.
MAX_M = 8
U = 2.0**-8  # bf16 unit roundoff


def inner_k_tiles(k: int) -> int | None:
    """The widest inner k-tiling the op takes for this K (8: 16-byte loads), or None."""
    for t in (8, 4, 2):
        if k % (16 * t) == 0:
            return t
    return None


def _fallback():
    """The kernel for the calls tinygemm does not take (checked to be available in ``unsupported``)."""
    from quantize.kernels.triton_gemm import TritonKernel

    return TritonKernel


def mm_by_m(x: torch.Tensor, tg_weight: torch.Tensor, tg_sz: torch.Tensor, qweight: torch.Tensor,
            scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """bf16 2-D ``x @ W.T``: tinygemm up to MAX_M rows, Triton above."""
    if x.shape[0] <= MAX_M:
        return int4_mm(x.contiguous(), tg_weight, group_size, tg_sz)
    from quantize.kernels.triton_gemm import wq_matmul

    return wq_matmul(x, qweight, scales, zeros, 4, group_size)


@torch.library.custom_op("quantize::int4_mm_by_m", mutates_args=())
def int4_mm_by_m(x: torch.Tensor, tg_weight: torch.Tensor, tg_sz: torch.Tensor, qweight: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`mm_by_m` as an opaque operator, so that it chooses by M when called, not when traced:
    torch.compile (and vLLM, which compiles once for every batch size) would otherwise bake in the branch
    of the traced M."""
    return mm_by_m(x, tg_weight, tg_sz, qweight, scales, zeros, group_size)


@int4_mm_by_m.register_fake
def _(x, tg_weight, tg_sz, qweight, scales, zeros, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1])


def scales_and_zeros(scales_ng: torch.Tensor, zeros_ng: torch.Tensor) -> torch.Tensor:
    """Our float16 scales and integer zeros ``[N, G]`` as tinygemm's bf16 ``[G, N, 2]`` (scale, zero_f)."""
    s = scales_ng.float()
    zf = s * (8.0 - zeros_ng.float())  # exact in float32: an 11-bit significand times an integer in [-7, 8]
    return torch.stack([s, zf], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` to the CUDA op's input: uint8 ``[N, K/2]``, code ``2j`` in the high nibble."""
    q = q.to(torch.uint8)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def unnibble(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nibbles` (tests)."""
    return torch.stack([b >> 4, b & 15], -1).reshape(b.shape[0], -1)


def pack_weight(q: torch.Tensor, k_tiles: int) -> torch.Tensor:
    """Codes ``[N, K]`` (on the device that will run the op) in the op's packed form."""
    if q.device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(nibbles(q), k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), k_tiles)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for 2-D bf16 ``x`` through the op (CUDA, or the CPU variant)."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


def op_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    if getattr(torch.version, "hip", None):
        return "ROCm build (its tinygemm tiles differ; not tested here)"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "this torch has no aten._weight_int4pack_mm"
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability 8.0 or newer"
    return None


def shape_unsupported(spec: LinearSpec, n_multiple: int) -> str | None:
    """What the int4 pack layout (CUDA's and the CPU's) cannot hold: group sizes, K tiles, N rounding."""
    if spec.group_size not in GROUP_SIZES:
        return f"group size {spec.group_size} (supported: {', '.join(map(str, GROUP_SIZES))})"
    if inner_k_tiles(spec.in_features) is None:
        return f"in_features {spec.in_features} is not a multiple of 32"
    if spec.out_features % n_multiple:
        return f"out_features {spec.out_features} is not a multiple of {n_multiple}"
    return None


@register_kernel("tinygemm")
class TinygemmKernel:
    priority = 20  # above Triton (10): it wins for bf16 at small M, and hands every other call to Triton

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        why = op_unavailable(device)
        if why:
            return why
        if spec.bits != 4:
            return f"4-bit weights only, not {spec.bits}-bit"
        why = shape_unsupported(spec, n_multiple=8)
        if why:
            return why
        if "triton" not in KERNELS:
            return "needs Triton (its kernels take the float16/float32 and M > MAX_M calls)"
        return _fallback().unsupported(spec, device)

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        q, scales_ng, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), 4, spec.in_features, spec.out_features)
        state = dict(_fallback().prepare(spec, qweight, qzeros, scales))
        state["tg_weight"] = pack_weight(q, inner_k_tiles(spec.in_features))
        state["tg_sz"] = scales_and_zeros(scales_ng, zeros)
        return state

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.dtype != torch.bfloat16:
            return _fallback().apply(spec, state, x, bias)
        # The op only where torch.compile traces; eager calls skip its Python dispatch (as in TritonKernel.apply)
        matmul = int4_mm_by_m if torch.compiler.is_compiling() else mm_by_m
        y = matmul(x2, state["tg_weight"], state["tg_sz"], state["qweight"], state["scales"], state["zeros"], spec.group_size)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], spec.out_features)
