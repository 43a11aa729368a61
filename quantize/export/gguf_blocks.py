"""Our integer codes in ggml's block types (the byte layouts of ggml-quants.c, read back by gguf-py's
``gguf.quants.dequantize``, which the tests use as the reference).

Every encoder takes a layer's codes ``q`` ``[N, K]``, its zero points and float16 scales expanded to one
per sub-block (``[N, K // sub]``), and returns the tensor's bytes ``[N, K // block * type_size]``. The
codes are never re-rounded: SignRound's rounding decisions survive. What each type keeps:

- ``Q4_0``, ``Q8_0``: ``w = d * (q - z)`` with ``d`` our float16 scale: exact when ``q - z`` fits
  (``[-8, 7]``, ``[-128, 127]``).
- ``Q4_1``: ``w = d * q + m``, ``d`` our scale, ``m = -scale * zero`` rounded to float16: exact for
  symmetric layers (``zero`` is a power of two), within float16 rounding of ``m`` otherwise.
- ``Q4_K``, ``Q5_K``: ``w = d * sc * q - dmin * m`` per 32 weights with 6-bit ``sc``/``m`` and float16
  ``d``/``dmin`` per 256: our scales and ``scale * zero`` are rounded to that grid (a negative scale is
  made positive by mirroring the codes, ``q -> 2**bits - 1 - q``).
- ``Q6_K``: ``w = d * sc * (q6 - 32)`` per 16 weights with a signed 8-bit ``sc``: ``q6 = q - zero + 32``,
  our scales rounded to ``d * sc``.
- ``Q2_K``: ``w = d * sc * q - dmin * m`` per 16 weights with 4-bit ``sc``/``m`` and float16 ``d``/``dmin``
  per 256: holds 2-bit codes (sym or asym; a negative scale mirrors the codes as in Q4_K). Our scales are
  rounded to the 4-bit grid, then ``scale * zero`` is moved by the scale's rounding error times the
  sub-block's mean code (the least-squares min for the rounded scale) and rounded to its own 4-bit grid.
  ``d``/``dmin`` are the grid steps, among a few candidates per super-block, with the least squared weight
  error. Only 16 levels per 256 weights: the coarsest of these types (see the tests' stated tolerance).
- ``Q3_K``: ``w = d * sc * (q3 - 4)`` per 16 weights with a signed 6-bit ``sc`` (``[-32, 31]``), float16
  ``d`` per 256, no min: holds ``q - zero`` in ``[-4, 3]`` (sym 3-bit, zero 4; any 2-bit layer), or in
  ``[-3, 4]`` per sub-block by negating code and scale. Asym 3-bit groups whose zero is far from 4 do not
  fit and are refused. Our scales are rounded to ``d * sc`` (``d`` searched as for Q2_K).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256


class BlockError(ValueError):
    """These codes do not fit the type; the message says why."""


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo | (hi << 4)).astype(np.uint8)


def _signed(q, zeros, low: int, high: int, type_name: str) -> np.ndarray:
    c = q.astype(np.int16) - zeros.astype(np.int16)
    if c.min() < low or c.max() > high:
        raise BlockError(f"{type_name} holds q - zero in [{low}, {high}], these codes span [{c.min()}, {c.max()}]")
    return c


def _per_weight(x: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(x, k // x.shape[1], axis=1)


def q4_0(q, zeros, scales) -> np.ndarray:
    n, k = q.shape
    c = _signed(q, _per_weight(zeros, k), -8, 7, "Q4_0") + 8
    blocks = c.reshape(-1, 32).astype(np.uint8)
    packed = _nibbles(blocks[:, :16], blocks[:, 16:])
    return np.concatenate([_f16_bytes(scales), packed], axis=1).reshape(n, -1)


def q8_0(q, zeros, scales) -> np.ndarray:
    n, k = q.shape
    c = _signed(q, _per_weight(zeros, k), -128, 127, "Q8_0")
    blocks = c.reshape(-1, 32).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(scales), blocks], axis=1).reshape(n, -1)


def q4_1(q, zeros, scales) -> np.ndarray:
    n, k = q.shape
    if q.max() > 15:
        raise BlockError(f"Q4_1 holds 4-bit codes, these reach {q.max()}")
    blocks = q.reshape(-1, 32).astype(np.uint8)
    mins = -scales.astype(np.float32) * zeros.astype(np.float32)
    packed = _nibbles(blocks[:, :16], blocks[:, 16:])
    return np.concatenate([_f16_bytes(scales), _f16_bytes(mins), packed], axis=1).reshape(n, -1)


def _grid(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ``values`` ``[B, 8]`` as float16 ``d`` ``[B]`` times integers in ``[0, levels]``."""
    d = (values.max(axis=1) / levels).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    ints = np.where(df > 0, np.rint(values / np.where(df > 0, df, 1)), 0)
    return d, np.clip(ints, 0, levels).astype(np.uint8)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[B, 8]`` in ggml's 12-byte packing (get_scale_min_k4's inverse)."""
    lo_d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    lo_m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo_d, lo_m, hi], axis=1).astype(np.uint8)


def _k_affine(q, zeros, scales, bits: int, max_code: int):
    """Positive-scale codes ``[B, 8, 32]`` and the 6-bit grids of scales and mins per super-block."""
    n, k = q.shape
    if q.max() > max_code:
        raise BlockError(f"holds codes up to {max_code}, these reach {q.max()}")
    s = scales.astype(np.float32)
    flip = s < 0  # mirror the codes so that every scale is positive: s * (q - z) = -s * ((m - q) - (m - z))
    top = 2**bits - 1
    z = np.where(flip, top - zeros.astype(np.float32), zeros.astype(np.float32))
    codes = np.where(_per_weight(flip, k), top - q.astype(np.int16), q.astype(np.int16))
    s = np.abs(s).reshape(-1, 8)
    d, sc = _grid(s, 63)
    dmin, mn = _grid(s * z.reshape(-1, 8), 63)
    return codes.reshape(-1, 8, 32).astype(np.uint8), d, dmin, sc, mn


def q4_k(q, zeros, scales, bits: int) -> np.ndarray:
    n = q.shape[0]
    try:
        codes, d, dmin, sc, mn = _k_affine(q, zeros, scales, bits, 15)
    except BlockError as e:
        raise BlockError(f"Q4_K {e}") from None
    qs = _nibbles(codes[:, 0::2], codes[:, 1::2]).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, mn), qs], axis=1).reshape(n, -1)


def q5_k(q, zeros, scales, bits: int) -> np.ndarray:
    n = q.shape[0]
    try:
        codes, d, dmin, sc, mn = _k_affine(q, zeros, scales, bits, 31)
    except BlockError as e:
        raise BlockError(f"Q5_K {e}") from None
    low = codes & 0x0F
    qs = _nibbles(low[:, 0::2], low[:, 1::2]).reshape(-1, 128)
    high = (codes >> 4) & 1  # [B, 8, 32]: bit j of byte l is sub-block j's element l
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, mn), qh, qs], axis=1).reshape(n, -1)


def q6_k(q, zeros, scales) -> np.ndarray:
    n, k = q.shape
    c = _signed(q, _per_weight(zeros, k), -32, 31, "Q6_K") + 32
    s = scales.astype(np.float32).reshape(-1, 16)
    d = (np.abs(s).max(axis=1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.where(df > 0, np.rint(s / np.where(df > 0, df, 1)), 0), -127, 127).astype(np.int8)
    v = c.reshape(-1, 2, 128).astype(np.uint8)
    lo, hi = v & 0x0F, v >> 4
    ql = _nibbles(lo[..., :64], lo[..., 64:]).reshape(-1, 128)
    qh = (hi[..., 0:32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:128] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh.astype(np.uint8), sc.view(np.uint8), _f16_bytes(d)], axis=1).reshape(n, -1)


def _search_grid(values: np.ndarray, weights: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` ``[B, S]`` as float16 ``d`` ``[B]`` times integers in ``[low, high]``: among steps
    ``max|v| / L`` (both signs where ``low < 0``), the one with the least ``sum(weights * err**2)``."""
    top = np.abs(values).max(axis=1, keepdims=True)  # [B, 1]
    span = max(high, -low) + 0.49
    steps = np.linspace(0.75 * span, span, 24)
    if low < 0:
        steps = np.concatenate([steps, -steps])
    d = (top / steps[None, :]).astype(np.float16).astype(np.float32)[:, :, None]  # [B, C, 1]
    safe = np.where(d != 0, d, 1)
    ints = np.clip(np.rint(values[:, None, :] / safe), low, high)
    ints = np.where(d != 0, ints, 0)
    err = (weights[:, None, :] * (values[:, None, :] - d * ints) ** 2).sum(axis=2)  # [B, C]
    best = err.argmin(axis=1)
    rows = np.arange(values.shape[0])
    return d[rows, best, 0].astype(np.float16), ints[rows, best].astype(np.int16)


def _two_bit(codes: np.ndarray) -> np.ndarray:
    """Codes ``[B, 256]`` (low two bits used) in the K-quants' 2-bit packing: byte ``32h + l`` holds
    weight ``128h + 32j + l`` at bits ``2j``."""
    c = (codes.reshape(-1, 2, 4, 32).astype(np.uint8) & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return c.sum(axis=2, dtype=np.uint8).reshape(-1, 64)


def q2_k(q, zeros, scales, bits: int) -> np.ndarray:
    n, k = q.shape
    if q.max() > 3:
        raise BlockError(f"Q2_K holds 2-bit codes, these reach {q.max()}")
    s = scales.astype(np.float32)
    flip = s < 0  # s * (q - z) = -s * ((3 - q) - (3 - z)): every scale positive
    z = np.where(flip, 3 - zeros.astype(np.float32), zeros.astype(np.float32))
    if z.min() < 0:
        raise BlockError(f"Q2_K subtracts a non-negative min, and a zero point of {3 - z.min():g} with a negative scale needs a negative one")
    codes = np.where(_per_weight(flip, k), 3 - q.astype(np.int16), q.astype(np.int16)).reshape(-1, 16, 16)
    s = np.abs(s).reshape(-1, 16)
    mins = s * z.reshape(-1, 16)
    cf = codes.astype(np.float32)
    mean = cf.mean(axis=2)
    d, sc = _search_grid(s, ((cf - mean[..., None]) ** 2).sum(axis=2) + 1e-3, 0, 15)
    # The min that best absorbs the scale's rounding: w = s_hat * q - m' with m' = m + (s_hat - s) * mean(q).
    target = np.maximum(mins + (d.astype(np.float32)[:, None] * sc - s) * mean, 0)
    dmin, mn = _search_grid(target, np.ones_like(target), 0, 15)
    packed_scales = (sc | (mn << 4)).astype(np.uint8)
    return np.concatenate([packed_scales, _two_bit(codes), _f16_bytes(d), _f16_bytes(dmin)], axis=1).reshape(n, -1)


def q3_k(q, zeros, scales, bits: int) -> np.ndarray:
    n, k = q.shape
    c = (q.astype(np.int16) - _per_weight(zeros, k).astype(np.int16)).reshape(-1, 16)  # one sub-block a row
    lo, hi = c.min(axis=1), c.max(axis=1)
    fits = (lo >= -4) & (hi <= 3)
    mirror = ~fits & (lo >= -3) & (hi <= 4)  # s * c = (-s) * (-c)
    if not (fits | mirror).all():
        bad = ~(fits | mirror)
        raise BlockError(f"Q3_K holds q - zero in [-4, 3] (or [-3, 4], negated) per 16 weights, {int(bad.sum())} sub-blocks span "
                         f"up to [{lo[bad].min()}, {hi[bad].max()}]")
    c = np.where(mirror[:, None], -c, c).reshape(-1, 16, 16)
    s = np.where(mirror, -1, 1).reshape(-1, 16) * scales.astype(np.float32).reshape(-1, 16)
    d, sc = _search_grid(s, (c.astype(np.float32) ** 2).sum(axis=2) + 1e-3, -32, 31)
    q3 = (c + 4).reshape(-1, 256).astype(np.uint8)
    high = (q3 >> 2).reshape(-1, 8, 32)  # bit b of hmask byte l: weight 32b + l
    hmask = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    u = (sc + 32).astype(np.uint8)  # [B, 16], 6 bits each
    low = (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4)
    top = ((u >> 4) & 3).reshape(-1, 4, 4)  # [B, k, i]: scale 4k + i -> byte 8 + i, bits 2k
    top = (top << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([hmask, _two_bit(q3), low.astype(np.uint8), top, _f16_bytes(d)], axis=1).reshape(n, -1)


# type name -> (encoder, sub-block size its scales are per, super-block length a row must divide into)
ENCODERS = {
    "Q4_0": (lambda q, z, s, bits: q4_0(q, z, s), 32, 32),
    "Q4_1": (lambda q, z, s, bits: q4_1(q, z, s), 32, 32),
    "Q8_0": (lambda q, z, s, bits: q8_0(q, z, s), 32, 32),
    "Q4_K": (q4_k, 32, QK_K),
    "Q5_K": (q5_k, 32, QK_K),
    "Q6_K": (lambda q, z, s, bits: q6_k(q, z, s), 16, QK_K),
    "Q2_K": (q2_k, 16, QK_K),
    "Q3_K": (q3_k, 16, QK_K),
}


def encode(type_name: str, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> np.ndarray:
    """A layer's codes ``[N, K]``, float16 scales and zeros ``[N, G]`` as ``type_name`` blocks."""
    fn, sub, block = ENCODERS[type_name]
    n, k = q.shape
    group = k // scales.shape[1]
    if k % block:
        raise BlockError(f"{type_name} needs rows of a multiple of {block} weights, this layer has {k}")
    if group % sub:
        raise BlockError(f"{type_name} has one scale per {sub} weights; groups of {group} do not split into them")
    per = group // sub
    s = np.repeat(scales.numpy().astype(np.float16), per, axis=1)
    z = np.repeat(zeros.numpy(), per, axis=1)
    return fn(q.numpy(), z, s, bits)
