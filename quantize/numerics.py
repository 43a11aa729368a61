"""Integer weight quantization rules, shared by tuning, export, loading and kernels.

Every rule works on weights viewed as groups: ``w`` of shape ``[N, K]`` becomes ``[N, K // g, g]``.
Codes are always unsigned, ``q`` in ``[0, 2**bits - 1]``, and ``w ~= scale * (q - zero)``:

- asym: ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)``, one per group.
- sym (AutoRound's full-range rule): the group's signed extreme ``m`` (``min`` or ``max``, whichever is
  larger in magnitude) gives ``scale = -m / 2**(bits-1)``, so ``m`` lands exactly on code 0 and all
  ``2**bits`` levels are used; the scale is negative when the extreme is positive. ``zero = 2**(bits-1)``
  for every group, the GPTQ convention, so sym checkpoints use the GPTQ layouts unchanged.

Scales are rounded to float16 where they are made, because checkpoints store them in float16: the
weights a tuned model sees are exactly the weights a loaded checkpoint gives back.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
# Smallest scale magnitude: keeps all-zero groups finite (AutoRound uses the same floor).
SCALE_EPS = 1e-5


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[N, K]`` as ``[N, K // g, g]``; ``group_size == -1`` means one group per row."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of group_size {g}")
    return w.reshape(n, k // g, g)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (x.round() - x).detach()


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round the scale through float16 (differentiably) and keep it away from zero, sign preserved."""
    scale = scale.to(SCALE_DTYPE).to(scale.dtype)
    return torch.where(scale < 0, scale.clamp(max=-SCALE_EPS), scale.clamp(min=SCALE_EPS))


def compute_qparams(
    wg: torch.Tensor,
    bits: int,
    sym: bool,
    min_scale: torch.Tensor | float = 1.0,
    max_scale: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for grouped weights ``[N, G, g]``; both returned as ``[N, G, 1]``.

    ``min_scale``/``max_scale`` (shape ``[N, G]`` or scalars, in ``[0, 1]``) shrink the group's range:
    SignRound tunes them to clip outliers. The zero point is rounded with a straight-through estimator
    so gradients still reach the range factors.
    """
    wmin = wg.amin(dim=-1).clamp(max=0) * min_scale
    wmax = wg.amax(dim=-1).clamp(min=0) * max_scale
    if sym:
        half = 2 ** (bits - 1)
        # The signed extreme: negative when |min| wins, so it lands on code 0, else on code 2**bits - 1.
        extreme = torch.where(-wmin > wmax, wmin, wmax)
        scale = _fp16_scale(-extreme / half)
        zero = torch.full_like(scale, float(half))
    else:
        maxq = 2**bits - 1
        scale = ((wmax - wmin) / maxq).to(SCALE_DTYPE).to(wg.dtype).clamp(min=SCALE_EPS)
        zero = round_ste(-wmin / scale)
    return scale.unsqueeze(-1), zero.unsqueeze(-1)


def quantize_codes(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Codes ``clamp(round(w / scale + v) + zero, 0, 2**bits - 1)`` (float, rounding straight-through).

    ``v`` is SignRound's learned rounding offset, same shape as ``wg`` (0 gives round-to-nearest).
    """
    return torch.clamp(round_ste(wg / scale + v) + zero, 0, 2**bits - 1)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _quantize_groups(w, bits, group_size, sym, v, min_scale, max_scale):
    """Codes ``[N, G, g]`` (float), scales and zeros ``[N, G, 1]``: the one path both forms below take."""
    wg = to_groups(w.float(), group_size)
    scale, zero = compute_qparams(wg, bits, sym, min_scale, max_scale)
    v = v.reshape(wg.shape) if isinstance(v, torch.Tensor) else v
    return quantize_codes(wg, scale, zero, bits, v), scale, zero


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    v: torch.Tensor | float = 0.0,
    min_scale: torch.Tensor | float = 1.0,
    max_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` in float32, differentiable in ``v`` and the range factors."""
    q, scale, zero = _quantize_groups(w, bits, group_size, sym, v, min_scale, max_scale)
    return dequantize_groups(q, scale, zero).reshape(w.shape)


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    v: torch.Tensor | float = 0.0,
    min_scale: torch.Tensor | float = 1.0,
    max_scale: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final integer form of ``w`` ``[N, K]``: codes ``[N, K]`` (uint8), scales ``[N, G]`` (float16),
    zero points ``[N, G]`` (uint8). ``dequantize(*quantize_weight(...))`` equals ``fake_quantize(...)``."""
    with torch.no_grad():
        q, scale, zero = _quantize_groups(w, bits, group_size, sym, v, min_scale, max_scale)
        return (
            q.reshape(w.shape).to(torch.uint8),
            scale.squeeze(-1).to(SCALE_DTYPE),
            zero.squeeze(-1).to(torch.uint8),
        )


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weights ``[N, K]`` from codes ``[N, K]``, scales and zeros ``[N, G]`` (group size ``K // G``).

    Computed in float32 and cast once, so every path (in-memory model, loaded checkpoint, kernels'
    reference) produces bit-identical weights.
    """
    n, k = q.shape
    groups = scales.shape[-1]
    qg = q.reshape(n, groups, k // groups).float()
    # (contiguous: a transposed checkpoint view would steer the elementwise op's loop order)
    w = dequantize_groups(qg, scales.float().contiguous().unsqueeze(-1), zeros.float().unsqueeze(-1))
    return w.reshape(n, k).to(dtype)
