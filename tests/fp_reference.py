"""Slow, obvious references for the floating-point numerics tests (tests/test_numerics_*.py).

Python floats and loops only: a format's grid is listed from its definition, a cast picks the nearest
listed value (ties to the even code), exponents come from ``math.frexp``. Where a rule computes in float32
(NVFP4's and FP8's scales), the reference does each operation in ``numpy.float32`` so that it rounds where
the rule rounds.
"""

from __future__ import annotations

import bisect
import math

import numpy as np


def grid(ebits: int, mbits: int, bias: int, max_value: float) -> list[float]:
    """The non-negative values of a sign/exponent/mantissa format, index = code (sign bit clear)."""
    values = []
    for exp_field in range(2**ebits):
        for m in range(2**mbits):
            if exp_field == 0:  # subnormal: no implicit 1, exponent of the smallest normal
                values.append(m / 2**mbits * 2.0 ** (1 - bias))
            else:
                values.append((1 + m / 2**mbits) * 2.0 ** (exp_field - bias))
    return [v for v in values if v <= max_value]  # E4M3fn: the code above 448 is NaN


FP4 = grid(2, 1, 1, 6.0)
FP8 = grid(4, 3, 7, 448.0)


def cast(x: float, values: list[float]) -> float:
    """Nearest grid value to ``x``, ties to the even code; beyond the largest value, the largest (saturate)."""
    a = abs(x)
    if a >= values[-1]:
        r = values[-1]
    else:
        i = bisect.bisect_right(values, a) - 1  # values[i] <= a < values[i + 1]
        lo, hi = values[i], values[i + 1]
        if a - lo < hi - a:
            r = lo
        elif hi - a < a - lo:
            r = hi
        else:
            r = lo if i % 2 == 0 else hi
    return math.copysign(r, x)


def code(q: float, values: list[float]) -> int:
    """The bit pattern of a grid value: its index, with the sign as the top bit."""
    bits = 4 if values is FP4 else 8
    return values.index(abs(q)) | ((1 << (bits - 1)) if math.copysign(1.0, q) < 0 else 0)


def floor_log2(x: float) -> int:
    return math.frexp(abs(x))[1] - 1


def mx(row: list[float], values: list[float], group: int = 32):
    """MX by the OCP rule, one group at a time: (dequantized values, integer exponents)."""
    emax = floor_log2(values[-1])
    out, exps = [], []
    for j in range(0, len(row), group):
        grp = row[j : j + group]
        amax = max(abs(x) for x in grp)
        e = (floor_log2(amax) if amax > 0 else 1) - emax
        e = min(max(e, -127), 127)
        scale = 2.0**e
        out += [cast(x / scale, values) * scale for x in grp]
        exps.append(e)
    return out, exps


def f32(x) -> np.float32:
    return np.float32(x)


def nvfp4(row: list[float], gs: np.float32, group: int = 16):
    """NVFP4 one group at a time in float32 steps: (dequantized values, FP8 group scales)."""
    out, scales = [], []
    for j in range(0, len(row), group):
        grp = [f32(x) for x in row[j : j + group]]
        amax = max(abs(x) for x in grp)
        raw = gs * (amax / f32(6.0))
        s = f32(cast(float(min(max(raw, f32(2.0**-9)), f32(448.0))), FP8))
        eff = s / gs
        out += [float(f32(cast(float(x / eff), FP4)) * eff) for x in grp]
        scales.append(float(s))
    return out, scales


def fp8_scaled(x: float, scale: np.float32) -> float:
    """``scale * fp8(x / scale)`` in float32 steps."""
    return float(f32(cast(float(f32(x) / scale), FP8)) * scale)
