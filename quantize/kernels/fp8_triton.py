"""Triton device code for FP8_STATIC layers (quantize.kernels.fp8_scaled_mm): the input rounded to FP8
codes under its static scale in one pass, with the per-row scales ``torch._scaled_mm`` takes (torch's own
ops take four passes: float32 copy, division, clamp, cast).

The rounding is the scheme's rule (quantize.numerics_fp8.codes: ``x / scale`` in float32, correctly
rounded (``div_rn``: Triton's ``/`` may be approximate), saturated at ±448, round to nearest even),
computed on the float32 bits: the result is an exact E4M3 value, so the final cast to ``float8e4nv``
rounds nothing. (Triton's own float32 -> fp8 cast in its CPU interpreter loses the carry into the next
exponent, 31.85 -> 16; on the GPU it is the hardware's; computing the value first makes both agree with
torch.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _e4m3(v):
    """``v`` (float32) saturated at ±448 and rounded to the nearest E4M3 value, ties to even, in integer
    arithmetic on its bits: keep 3 fraction bits (fewer below 2^-6, where E4M3 steps by 2^-9)."""
    bits = tl.minimum(tl.abs(v), E4M3_MAX).to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = (bits & 0x7FFFFF) | 0x800000  # the 24-bit significand (of 0: 2^23, which rounds to 0 below)
    drop = tl.minimum(20 + tl.maximum(-6 - e, 0), 26)
    r = (m + (1 << (drop - 1)) - 1 + ((m >> drop) & 1)) >> drop  # <= 16: exact in float32
    unit = ((e + drop - 23 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e + drop - 23), >= 2^-9
    a = r.to(tl.float32) * unit
    return tl.where(v < 0, -a, a)


@triton.jit
def _fp8_codes(x_ptr, s_ptr, q_ptr, rs_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """Row ``m`` of ``x`` as FP8 codes, and the scale in ``rs[m]`` (cuBLASLt's row-wise operand)."""
    m = tl.program_id(0)
    s = tl.load(s_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + m * K + offs, _e4m3(tl.div_rn(x, s)).to(tl.float8e4nv), mask=offs < K)
    tl.store(rs_ptr + m, s)


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 codes of ``x`` ``[M, K]``, float32 ``[M, 1]`` filled with ``scale``) in one pass."""
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    rows = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    _fp8_codes[(m,)](x, scale, q, rows, k, x.stride(0), BLOCK_K=1024, num_warps=4)
    return q, rows
