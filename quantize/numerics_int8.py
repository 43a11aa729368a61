"""Signed symmetric integers with an absmax scale: the W8A8 rule (INT8 weights per output channel,
activations per token) and, at ``bits=4``, the W4A4 activations.

    scale = amax * max_scale / (2**(bits-1) - 1)          amax per row: an output channel or a token
    q     = clamp(round(x / scale + v), -2**(bits-1), 2**(bits-1) - 1)     signed, zero point 0
    x_hat = scale * q

This is what the serving side computes and stores: compressed-tensors' ``int-quantized`` format keeps
``weight`` as signed int8 and ``weight_scale`` ``[N, 1]`` with ``weight = q * scale``, and vLLM's dynamic
per-token int8 activation quantization (``scaled_int8_quant``) uses ``amax / 127``. ``±amax`` lands exactly
on ``±127``; ``-128`` is reached only through SignRound's offset ``v``.

It is not ``quantize/numerics.py``'s int rule, on purpose: that one (AutoRound's "full range" sym) uses
``scale = -extreme / 2**(bits-1)`` with unsigned codes and a zero point of ``2**(bits-1)``, for the GPTQ
layouts; W8A8 engines want signed codes, zero point 0 and the positive ``amax / 127``. Two known neighbours
differ by under one grid step: AutoRound's INT8 scheme tunes with that full-range rule (``/128``), and
llm-compressor's observer divides by ``127.5`` (half the 255-wide range). Scales are float32.
"""

from __future__ import annotations

import torch

from .numerics import round_ste

# Scale floor: keeps an all-zero row finite without touching any real scale (float32's smallest normal).
MIN_SCALE = torch.finfo(torch.float32).tiny


def qmax(bits: int) -> int:
    """Largest code, ``2**(bits-1) - 1`` (127 for int8, 7 for int4): the code ``amax`` maps to."""
    return 2 ** (bits - 1) - 1


def row_scales(x: torch.Tensor, bits: int = 8, max_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``amax * max_scale / qmax`` per row of ``x`` ``[..., K]``: ``[..., 1]`` float32. ``amax`` is detached
    (a scale is a statistic of its row; SignRound tunes it only through ``max_scale``)."""
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return (amax * max_scale / qmax(bits)).clamp(min=MIN_SCALE)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, bits: int = 8, v: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Signed codes ``clamp(round(x / scale + v), -2**(bits-1), qmax)`` (float, rounding straight-through;
    ``torch.round`` ties to even, as vLLM's kernels' ``nearbyint``)."""
    return torch.clamp(round_ste(x.float() / scale + v), -(2 ** (bits - 1)), qmax(bits))


def fake_quantize(
    w: torch.Tensor, bits: int = 8, v: torch.Tensor | float = 0.0, max_scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` per output channel (float32), differentiable in ``v`` ``[N, K]``
    and ``max_scale`` ``[N, 1]`` (or scalars)."""
    scale = row_scales(w, bits, max_scale)
    return quantize_codes(w, scale, bits, v) * scale


def quantize_weight(
    w: torch.Tensor, bits: int = 8, v: torch.Tensor | float = 0.0, max_scale: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final form: (signed codes ``[N, K]`` int8, scales ``[N, 1]`` float32), compressed-tensors'
    ``int-quantized`` ``weight`` / ``weight_scale``. ``dequantize`` of it equals ``fake_quantize``."""
    with torch.no_grad():
        scale = row_scales(w, bits, max_scale)
        return quantize_codes(w, scale, bits, v).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in float32, cast once."""
    return (q.float() * scale.float()).to(dtype)
