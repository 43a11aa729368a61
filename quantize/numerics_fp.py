"""Floating-point element formats: FP4 E2M1 and FP8 E4M3 (fn), and E8M0 power-of-two exponents.

The schemes of issue 14 (MXFP4, MXFP8, NVFP4, FP8) all end in one step: a scaled value ``x`` is cast onto
the grid of a small float format. This module is that step and the storage of its results, nothing else;
the scale rules live in ``numerics_mx``, ``numerics_nvfp4``, ``numerics_fp8`` and ``numerics_act``.

- ``cast`` rounds to the nearest grid value, ties to even (the IEEE rule, what GPUs' ``cvt.rn.satfinite``
  conversions and compressed-tensors' FP4 cast do), subnormals included, and saturates at ``±max``.
  ``round_to_grid`` computes it with exact float32 arithmetic for any format (FP4 needs no lookup);
  for FP8 ``cast`` uses torch's ``float8_e4m3fn`` cast, which gives the same bits (tested) faster.
- Two straight-through forms for tuning, differing only in the gradient: ``cast_ste`` (identity, what
  AutoRound's NVFP4 and FP8 casts give) and ``cast_ste_relative`` (``q / x`` above the smallest normal,
  what AutoRound's MX element cast gives; see its docstring for why that is the right surrogate there).
- Codes: ``encode``/``decode`` between grid values and their bit patterns (uint8: 4 bits for FP4, the
  ``float8_e4m3fn`` bits for FP8). ``pack_fp4``/``unpack_fp4`` put two FP4 codes in a byte in
  compressed-tensors' order (element ``2i`` in the low nibble).
- E8M0: ``floor_log2`` reads the exponent out of the float32 bits (``frexp``), never through ``log2``
  (float ``log2`` of the value just below ``2**k`` rounds up to ``k`` for ``|k| >= 4``) nor through torch's
  ``float8_e8m0fnu`` cast (which rounds to the nearest power of two: 3.0 becomes 4.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FPFormat:
    """A sign-exponent-mantissa format with no infinities (the OCP "fn" formats of MX, NVFP4 and FP8)."""

    name: str
    ebits: int
    mbits: int  # explicit mantissa bits
    bias: int
    max: float  # largest finite value; the formats saturate here
    torch_dtype: torch.dtype | None = None  # torch's own dtype for the format, where it has one

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value; subnormals share its spacing."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest value, ``floor(log2(max))``: 2 for E2M1, 8 for E4M3. MX scales use it."""
        return int(self.max).bit_length() - 1

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits


FP4_E2M1 = FPFormat("fp4_e2m1", ebits=2, mbits=1, bias=1, max=6.0)
FP8_E4M3 = FPFormat("fp8_e4m3fn", ebits=4, mbits=3, bias=7, max=448.0, torch_dtype=torch.float8_e4m3fn)

E8M0_BIAS = 127
E8M0_MIN, E8M0_MAX = -127, 127  # code 255 is NaN: exponents stay in [-127, 127], codes in [0, 254]


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(|x|))`` as int32, exact for every finite nonzero float32 (subnormals too).

    ``frexp`` gives ``|x| = m * 2**e`` with ``m`` in ``[0.5, 1)``, so the answer is ``e - 1``. Zero gives
    ``-1`` (``frexp(0) = (0, 0)``); callers decide what a zero means for them.
    """
    return torch.frexp(x.float())[1] - 1


def ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= x`` for positive float32 ``x``, exactly (``2**ceil(log2(x))``): how
    DeepGEMM's UE8M0 path (vLLM's ``VLLM_USE_DEEP_GEMM_E8M0``) rounds FP8 block scales."""
    e = floor_log2(x)
    p = torch.ldexp(torch.ones_like(x, dtype=torch.float32), e)
    return torch.where(p < x, p * 2, p)


def round_to_grid(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Nearest ``fmt`` value to ``x`` (float32), ties to even, saturating at ``±fmt.max``; any format.
    No gradient (a rounding has none; the straight-through forms add theirs).

    Within one binade the grid is uniform with spacing ``2**(e - mbits)``; dividing by that power of two
    is exact, so ``torch.round`` (half to even) on the quotient is exactly RNE on the grid. A value that
    rounds up to the next power of two lands on a grid point of the next binade, so no second pass is
    needed. Saturating first keeps ``7.0`` at ``6.0`` for FP4 (RNE would carry it to 8).

    ``2**e`` is ``x``'s float32 bits with sign and mantissa masked off (float32 subnormals and zeros give 0,
    which the floor at ``emin`` replaces): 5x faster on the CPU than ``frexp`` and ``ldexp``, and this cast
    runs on every activation of an NVFP4 / MXFP4 model and in every step of the clipping search.
    """
    return round_to_grid_(x.detach().float().clamp(-fmt.max, fmt.max), fmt)  # a new tensor, rounded in place


def round_to_grid_(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """:func:`round_to_grid` in place, for a float32 tensor the caller owns and has already saturated to
    ``±fmt.max`` (two passes fewer over every activation of an NVFP4 model)."""
    q = (x.view(torch.int32) & 0x7F800000).view(torch.float32)
    q.mul_(2.0**-fmt.mbits).clamp_(min=2.0 ** (fmt.emin - fmt.mbits))
    return x.div_(q).round_().mul_(q)


def cast(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """``round_to_grid``, through torch's own cast where the format has a dtype (FP8: bit-identical, tested,
    and 2.5x faster on the CPU, which matters inside the tuning loop)."""
    if fmt.torch_dtype is None:
        return round_to_grid(x, fmt)
    # detached: a dtype cast passes gradients through, a rounding does not (the straight-through forms add it)
    return x.detach().float().clamp(-fmt.max, fmt.max).to(fmt.torch_dtype).float()


def cast_ste(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """``cast`` forward, identity backward (inside ``±max``; callers clamp first, as SignRound does).

    Without a gradient to carry it returns ``cast(x)`` itself: adding the carrier (a zero) would turn
    ``-0.0`` into ``+0.0``, and the packed bytes would differ from compressed-tensors' (same values)."""
    q = cast(x, fmt)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    return q + (x - x.detach())


def cast_ste_relative(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """``cast`` forward; backward ``q / x`` for normal values, identity for subnormal ones.

    Why: with a power-of-two scale (MX), the rounding error of a normal value is relative: doubling the
    scale moves every normal value into the next binade and leaves ``w_hat / w`` unchanged. Modelling the
    cast as ``q = x * const`` (gradient ``q / x``) makes the scale's gradient come only from what the
    scale really controls, the values it clips at ``max`` and the ones it pushes into the subnormal range.
    This is also exactly the gradient of AutoRound's ``quant_element`` (its per-element exponent goes
    through a straight-through floor), so SignRound sees the same gradients as Intel's MX tuning (tested).
    """
    q = cast(x, fmt)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q  # as in cast_ste: keeps the sign of zero
    normal = x.abs() >= 2.0**fmt.emin
    slope = torch.where(normal, q / torch.where(normal, x, torch.ones_like(x)), torch.ones_like(x)).detach()
    # ``x * slope`` is not exactly ``q`` in float32; adding a zero that carries its gradient keeps ``q`` exact
    return q + (x * slope - (x * slope).detach())


def encode(q: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Bit patterns (uint8) of values already on the ``fmt`` grid (``cast``'s output).

    ``sign << (bits - 1) | exponent_field << mbits | mantissa_field``; subnormals have exponent field 0.
    The sign is taken from the sign bit, so ``-0.0`` encodes as ``0b1000...`` (compressed-tensors' packer
    and torch's FP8 cast do the same).
    """
    a = q.float().abs()
    e = floor_log2(a).clamp(min=fmt.emin)
    sub = a < 2.0**fmt.emin
    mant = torch.ldexp(a, fmt.mbits - e)  # the significand as an integer: 2**mbits + field, or field if sub
    field = torch.where(sub, mant, mant - 2**fmt.mbits).to(torch.int32)
    exp_field = torch.where(sub, torch.zeros_like(e), e - fmt.emin + 1)
    code = (exp_field << fmt.mbits) | field | (torch.signbit(q).to(torch.int32) << (fmt.bits - 1))
    return code.to(torch.uint8)


def grid_values(fmt: FPFormat) -> torch.Tensor:
    """All ``2**bits`` values indexed by code (float32); E4M3's two NaN codes (0x7F, 0xFF) give NaN."""
    codes = torch.arange(2**fmt.bits, dtype=torch.int32)
    sign = torch.where((codes >> (fmt.bits - 1)) & 1 == 1, -1.0, 1.0)
    exp_field = (codes >> fmt.mbits) & (2**fmt.ebits - 1)
    field = (codes & (2**fmt.mbits - 1)).float()
    sub = exp_field == 0
    significand = torch.where(sub, field, field + 2**fmt.mbits)
    e = torch.where(sub, torch.full_like(exp_field, fmt.emin), exp_field - fmt.bias)
    values = sign * torch.ldexp(significand, e - fmt.mbits)
    return torch.where(values.abs() > fmt.max, torch.full_like(values, float("nan")), values)


def decode(codes: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Values (float32) of uint8 codes: a lookup in ``grid_values``."""
    return grid_values(fmt).to(codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """FP4 codes ``[..., K]`` (uint8, 0..15) to bytes ``[..., K // 2]``: element ``2i`` in the low nibble.

    The order of compressed-tensors' ``pack_fp4_to_uint8`` (and vLLM's, and AutoRound's), bit for bit.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {codes.shape[-1]}")
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., K // 2]`` to FP4 codes ``[..., K]`` (uint8), the inverse of ``pack_fp4``."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents (in ``[-127, 127]``) to E8M0 codes: ``exponent + 127`` as uint8."""
    if exponent.is_floating_point():
        raise TypeError("E8M0 codes are made from integer exponents (see floor_log2), not from float scales")
    return (exponent.clamp(E8M0_MIN, E8M0_MAX) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes to their scales ``2**(code - 127)`` as float32 (exact: ``2**-127`` is a float32 subnormal)."""
    e = codes.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)
