"""Tensor layouts of packed integer weights, shared by export, loading and kernels.

Codes are packed into int32 words as a little-endian bit stream: code ``i`` of a run occupies bits
``[i*b, (i+1)*b)`` of the run, word after word. For 2/4/8 bits a word holds ``32/b`` whole codes; for
3 bits a code may straddle two words (GPTQ's 3-bit layout is exactly this stream).

Layouts (``q`` codes ``[N, K]``, ``zeros`` ``[N, G]``, ``N`` = out_features, ``K`` = in_features):

- ``gptq``: ``qweight`` ``[K*b/32, N]`` packed along K; ``qzeros`` ``[G, N*b/32]`` packed along N and
  stored as ``zero - 1`` (AutoGPTQ's historical convention), ``scales`` ``[G, N]``. AutoRound's
  ``auto_round:auto_gptq`` packing.
- ``auto_round``: the same tensors with zeros stored as they are (AutoRound's native asym packing).
- ``awq``: ``qweight`` ``[K, N*b/32]`` packed along N, ``qzeros`` ``[G, N*b/32]``, both with AWQ's
  interleaved order inside each group of 8 codes; zeros as they are. 4-bit only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Slot s of an AWQ word holds column AWQ_ORDER[s] of its 8-column group.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative codes ``[..., L]`` (``L * bits`` divisible by 32) into int32 ``[..., L*bits/32]``."""
    *lead, length = codes.shape
    if (length * bits) % 32:
        raise ValueError(f"cannot pack {length} codes of {bits} bits into whole 32-bit words")
    c = codes.to(torch.int64)
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=c.device, dtype=torch.int64) * bits
        words = (c.reshape(*lead, -1, per_word) << shifts).sum(-1)
    else:
        # Spread every code into its bits, then regroup the stream 32 bits at a time.
        bit_pos = torch.arange(bits, device=c.device, dtype=torch.int64)
        stream = ((c.unsqueeze(-1) >> bit_pos) & 1).reshape(*lead, -1, 32)
        words = (stream << torch.arange(32, device=c.device, dtype=torch.int64)).sum(-1)
    return _to_int32(words)


def unpack_bits(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[..., W]`` to codes ``[..., length]`` (uint8).

    Reads the words as their little-endian byte stream, in which every ``bits`` bytes hold 8 whole codes
    (one byte holds ``8/bits`` for 2/4/8 bits), so the work is byte-wide: 3-8x faster than shifting
    every word 32 ways, which mattered where a kernel unpacks per call (CPU prefill)."""
    stream = words.contiguous().view(torch.uint8)
    if sys.byteorder != "little":
        stream = stream.reshape(*words.shape, 4).flip(-1).flatten(-2)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=stream.device)
        codes = ((stream.unsqueeze(-1) >> shifts) & mask).flatten(-2)
    else:
        pad = -stream.shape[-1] % bits
        stream = F.pad(stream, (0, pad)) if pad else stream
        chunks = stream.reshape(*stream.shape[:-1], -1, bits).to(torch.int32 if bits < 4 else torch.int64)
        value = chunks[..., :1]
        for j in range(1, bits):
            value = value | (chunks[..., j : j + 1] << (8 * j))
        shifts = torch.arange(0, 8 * bits, bits, dtype=value.dtype, device=stream.device)
        codes = ((value >> shifts) & mask).to(torch.uint8).flatten(-2)
    return codes[..., :length]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _awq_interleave(x: torch.Tensor) -> torch.Tensor:
    *lead, n = x.shape
    order = torch.tensor(AWQ_ORDER, device=x.device)
    return x.reshape(*lead, n // 8, 8)[..., order].reshape(*lead, n)


def _awq_deinterleave(x: torch.Tensor) -> torch.Tensor:
    *lead, n = x.shape
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=x.device))
    return x.reshape(*lead, n // 8, 8)[..., inverse].reshape(*lead, n)


# The checkpoint names of one quantized layer's tensors (the fields of PackedLinear).
PACKED_TENSORS = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class PackedLinear:
    """The tensors one quantized linear layer is stored as (names as in the checkpoint)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor


LAYOUTS = ("gptq", "auto_round", "awq")


def pack(layout: str, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> PackedLinear:
    """Pack codes ``[N, K]``, float16 scales and zeros ``[N, G]`` into ``layout``."""
    zeros = zeros.to(torch.int64)
    if layout == "awq":
        if bits != 4:
            raise ValueError(f"the awq layout holds 4-bit weights only, not {bits}-bit")
        qweight = pack_bits(_awq_interleave(q.t()), bits)
        qzeros = pack_bits(_awq_interleave(zeros.t()), bits)
    elif layout in ("gptq", "auto_round"):
        qweight = pack_bits(q, bits).t()
        if layout == "gptq":
            zeros = (zeros - 1).clamp(0, 2**bits - 1)
        qzeros = pack_bits(zeros.t(), bits)
    else:
        raise ValueError(f"unknown packing layout {layout!r}; expected one of {LAYOUTS}")
    return PackedLinear(qweight.contiguous(), qzeros.contiguous(), scales.t().contiguous().to(torch.float16))


def unpack(
    layout: str, packed: PackedLinear, bits: int, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[N, K]`` (uint8), scales ``[N, G]`` (float16) and zeros ``[N, G]`` (uint8) from ``packed``."""
    k, n = in_features, out_features
    if layout == "awq":
        q = _awq_deinterleave(unpack_bits(packed.qweight, bits, n)).t()
        zeros = _awq_deinterleave(unpack_bits(packed.qzeros, bits, n)).t()
    elif layout in ("gptq", "auto_round"):
        q = unpack_bits(packed.qweight.t(), bits, k)
        zeros = unpack_bits(packed.qzeros, bits, n).t()
        if layout == "gptq":
            zeros = zeros + 1
    else:
        raise ValueError(f"unknown packing layout {layout!r}; expected one of {LAYOUTS}")
    return q.contiguous(), packed.scales.t().contiguous(), zeros.contiguous()


def packed_shapes(layout: str, bits: int, in_features: int, out_features: int, groups: int) -> dict[str, tuple]:
    """Expected tensor shapes, used to validate checkpoints before loading them."""
    k, n = in_features, out_features
    if layout == "awq":
        return {"qweight": (k, n * bits // 32), "qzeros": (groups, n * bits // 32), "scales": (groups, n)}
    return {"qweight": (k * bits // 32, n), "qzeros": (groups, n * bits // 32), "scales": (groups, n)}


def layout_fits(layout: str, bits: int, in_features: int, out_features: int) -> str | None:
    """Why a layer of this shape cannot be packed in ``layout``, or None if it can (``None``: no packing)."""
    if layout is None:
        return None
    if layout == "awq" and bits != 4:
        return f"the awq layout holds 4-bit weights only, not {bits}-bit"
    if layout == "awq" and out_features % 8:
        return f"out_features {out_features} is not a multiple of 8 (awq layout)"
    if layout != "awq" and (in_features * bits) % 32:
        return f"in_features {in_features} x {bits} bits does not fill whole 32-bit words"
    if (out_features * bits) % 32:
        return f"out_features {out_features} x {bits} bits does not fill whole 32-bit words"
    return None
