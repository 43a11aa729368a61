"""MX (OCP microscaling) weights: MXFP4 and MXFP8, groups of 32 sharing a power-of-two E8M0 scale.

For a group with largest magnitude ``amax`` (times SignRound's clipping factor ``max_scale``):

    e     = floor(log2(amax * max_scale)) - emax(element)      emax: 2 for FP4 E2M1, 8 for FP8 E4M3
    scale = 2**e,  stored as the E8M0 code e + 127,            e clamped to [-127, 127]
    w_hat = scale * cast(clamp(w / scale + v, ±max))

the rule of the OCP MX spec and of AutoRound 0.16.1's ``quant_mx`` (so ``amax / scale`` lies in
``[2**emax, 2**(emax+1))``: for FP4 group maxima in ``[6, 8)`` saturate at 6). ``v`` is SignRound's
rounding offset, added after the division by the scale and before the cast to the FP grid.

Differences from AutoRound, all intended: the exponent is computed from the float32 bits (``frexp``) where
AutoRound takes ``floor(torch.log2(.))``, which rounds up for the value just below ``2**k`` (``|k| >= 4``),
giving a scale twice too large for such a group; an all-zero group gets the same exponent as AutoRound's
(``1 - emax``) so stored scales agree. compressed-tensors' own calibration (``generate_mx_scales``) rounds
``amax`` up to the next power of two when its mantissa is ``>= 1.75``; its loaders only read ``2**(code-127)``,
which is what ``dequantize`` computes, so that difference never reaches a checkpoint we write.
"""

from __future__ import annotations

import torch

from .numerics import to_groups
from .numerics_fp import (
    E8M0_MAX,
    E8M0_MIN,
    FP4_E2M1,
    FP8_E4M3,
    FPFormat,
    cast_ste_relative,
    decode,
    e8m0_decode,
    e8m0_encode,
    encode,
    floor_log2,
    pack_fp4,
    unpack_fp4,
)

MX_GROUP = 32
MXFP4 = FP4_E2M1
MXFP8 = FP8_E4M3


def shared_exponent(amax: torch.Tensor, fmt: FPFormat, max_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Integer exponents ``floor(log2(amax * max_scale)) - emax`` clamped to E8M0's range (int32).

    An all-zero group (``amax * max_scale == 0``) gets ``1 - emax``, AutoRound's value; any scale
    reproduces its zeros.
    """
    m = (amax * max_scale).detach().float()
    e = torch.where(m > 0, floor_log2(m), torch.ones_like(m, dtype=torch.int32)) - fmt.emax
    return e.clamp(E8M0_MIN, E8M0_MAX)


def shared_scale(amax: torch.Tensor, fmt: FPFormat, max_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``2**shared_exponent`` (float32), differentiable in ``max_scale`` by a straight-through floor.

    Forward it is exactly the power of two; backward it behaves like ``amax * max_scale / 2**emax``
    (gradient ``scale / max_scale``), as AutoRound's ``floor_ste(log2(.))`` does, so SignRound can push a
    group's clipping factor across a power of two.
    """
    scale = e8m0_decode(e8m0_encode(shared_exponent(amax, fmt, max_scale)))
    if not (isinstance(max_scale, torch.Tensor) and max_scale.requires_grad):
        return scale
    m = amax.float() * max_scale
    live = m > 0
    safe = torch.where(live, m, torch.ones_like(m))
    return scale * torch.where(live, safe / safe.detach(), torch.ones_like(m))


def _qdq_groups(w, fmt, v, max_scale, group_size):
    """Grid values ``[N, G, g]`` (on ``fmt``, straight-through) and scales ``[N, G, 1]``."""
    wg = to_groups(w.float(), group_size)
    if isinstance(max_scale, torch.Tensor):
        max_scale = max_scale.reshape(wg.shape[:-1])
    scale = shared_scale(wg.abs().amax(dim=-1), fmt, max_scale).unsqueeze(-1)
    v = v.reshape(wg.shape) if isinstance(v, torch.Tensor) else v
    x = torch.clamp(wg / scale + v, -fmt.max, fmt.max)
    return cast_ste_relative(x, fmt), scale


def fake_quantize(
    w: torch.Tensor,
    fmt: FPFormat,
    v: torch.Tensor | float = 0.0,
    max_scale: torch.Tensor | float = 1.0,
    group_size: int = MX_GROUP,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` (float32), differentiable in ``v`` ``[N, K]`` and ``max_scale``
    ``[N, K // group_size]`` (or scalars). ``fmt`` is ``MXFP4`` or ``MXFP8``."""
    q, scale = _qdq_groups(w, fmt, v, max_scale, group_size)
    return (q * scale).reshape(w.shape)


def to_storage(q: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Grid values ``[N, K]`` as stored: FP4 packed two per byte ``[N, K // 2]`` (uint8), FP8 as
    ``float8_e4m3fn`` ``[N, K]`` (compressed-tensors' ``mxfp4-pack-quantized`` / ``mxfp8-quantized``)."""
    if fmt == FP4_E2M1:
        return pack_fp4(encode(q, fmt))
    return q.to(torch.float8_e4m3fn)


def from_storage(data: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Grid values ``[N, K]`` (float32) from ``to_storage``'s form."""
    if fmt == FP4_E2M1:
        return decode(unpack_fp4(data), fmt)
    return data.float()


def quantize_weight(
    w: torch.Tensor,
    fmt: FPFormat,
    v: torch.Tensor | float = 0.0,
    max_scale: torch.Tensor | float = 1.0,
    group_size: int = MX_GROUP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final form of ``w`` ``[N, K]``: (elements as ``to_storage`` stores them, E8M0 scale codes
    ``[N, K // group_size]`` uint8). ``dequantize(*quantize_weight(w, fmt, ...), fmt)`` equals
    ``fake_quantize(w, fmt, ...)`` bit for bit."""
    with torch.no_grad():
        wg = to_groups(w.float(), group_size)
        ms = max_scale.reshape(wg.shape[:-1]) if isinstance(max_scale, torch.Tensor) else max_scale
        codes = e8m0_encode(shared_exponent(wg.abs().amax(dim=-1), fmt, ms))
        q, _ = _qdq_groups(w, fmt, v, max_scale, group_size)
        return to_storage(q.reshape(w.shape), fmt), codes


def dequantize(
    data: torch.Tensor, scale_codes: torch.Tensor, fmt: FPFormat, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weights ``[N, K]`` from stored elements and E8M0 codes ``[N, G]``, computed in float32, cast once."""
    q = from_storage(data, fmt)
    n, k = q.shape
    groups = scale_codes.shape[-1]
    w = q.reshape(n, groups, k // groups) * e8m0_decode(scale_codes).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)
