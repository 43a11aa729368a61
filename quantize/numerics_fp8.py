"""FP8 E4M3 weights with a float32 scale per output channel, per tensor, or per 128x128 block.

One rule for the three layouts, differing only in which elements share a scale:

    scale = max(amax * max_scale / 448, 1 / (448 * 512))        amax over the channel / tensor / block
    w_hat = scale * fp8(clamp(w / scale + v, ±448))

so ``weight = fp8 * scale``: the convention of compressed-tensors' ``float-quantized`` ``weight_scale``,
vLLM, and DeepSeek-style checkpoints' ``weight_scale_inv`` (despite the name it is the same multiplier,
not its reciprocal). The floor ``1 / (448 * 512)`` is vLLM's minimum scaling factor, as in AutoRound's
``quant_fp8_sym``/``quant_block_fp_sym``; it keeps an all-zero channel finite. Scales stay float32
(what DeepSeek and AutoRound store), so the tuned model sees exactly the loaded weights.

Blocks: scales ``[ceil(N / 128), ceil(K / 128)]``; a partial block at the edge takes the amax of the
elements it has, the same as padding with zeros (compressed-tensors' and DeepSeek's layout).
"""

from __future__ import annotations

import math

import torch

from .numerics_fp import FP8_E4M3, cast, cast_ste

MIN_SCALE = 1.0 / (FP8_E4M3.max * 512.0)
BLOCK = (128, 128)


def scale_from_amax(amax: torch.Tensor, max_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``amax * max_scale / 448`` floored at ``MIN_SCALE`` (float32)."""
    return (amax.float() * max_scale / FP8_E4M3.max).clamp(min=MIN_SCALE)


def qdq(x: torch.Tensor, scale: torch.Tensor, v: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``scale * fp8(clamp(x / scale + v, ±448))`` with a straight-through cast; ``scale`` broadcasts."""
    return cast_ste(torch.clamp(x.float() / scale + v, -FP8_E4M3.max, FP8_E4M3.max), FP8_E4M3) * scale


def codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The ``float8_e4m3fn`` codes ``qdq`` rounds ``x`` to (``qdq(x, scale) == codes(x, scale) * scale``):
    what FP8 tensor-core kernels take."""
    return torch.clamp(x.float() / scale, -FP8_E4M3.max, FP8_E4M3.max).to(torch.float8_e4m3fn)


def _expand_blocks(t: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-block values ``[ceil(N/bn), ceil(K/bk)]`` repeated to one per element ``[N, K]``."""
    bn, bk = block
    return t.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[: shape[0], : shape[1]]


def block_amax(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """Largest magnitude of each ``block`` of ``w`` ``[N, K]``: ``[ceil(N/bn), ceil(K/bk)]``."""
    n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.nn.functional.pad(w.detach().float().abs(), (0, kb * bk - k, 0, nb * bn - n))
    return padded.reshape(nb, bn, kb, bk).amax(dim=(1, 3))


def weight_scales(
    w: torch.Tensor, layout: str, max_scale: torch.Tensor | float = 1.0, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """Scales of ``w`` ``[N, K]`` for ``layout``: ``"channel"`` ``[N, 1]``, ``"tensor"`` ``[1]`` (shapes as
    compressed-tensors stores them) or ``"block"`` ``[ceil(N/128), ceil(K/128)]``. ``max_scale`` has the
    scales' shape (or is a scalar); the result is differentiable in it."""
    a = w.detach().float().abs()
    if layout == "channel":
        amax = a.amax(dim=1, keepdim=True)
    elif layout == "tensor":
        amax = a.amax().reshape(1)
    elif layout == "block":
        amax = block_amax(w, block)
    else:
        raise ValueError(f"FP8 weight layout must be 'channel', 'tensor' or 'block', got {layout!r}")
    return scale_from_amax(amax, max_scale)


def fake_quantize(
    w: torch.Tensor,
    layout: str,
    v: torch.Tensor | float = 0.0,
    max_scale: torch.Tensor | float = 1.0,
    block: tuple[int, int] = BLOCK,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` (float32), differentiable in ``v`` ``[N, K]`` and ``max_scale``."""
    scales = weight_scales(w, layout, max_scale, block)
    if layout == "block":
        scales = _expand_blocks(scales, tuple(w.shape), block)
    return qdq(w, scales, v)


def quantize_weight(
    w: torch.Tensor,
    layout: str,
    v: torch.Tensor | float = 0.0,
    max_scale: torch.Tensor | float = 1.0,
    block: tuple[int, int] = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final form: (``float8_e4m3fn`` ``[N, K]``, float32 scales as ``weight_scales`` shapes them).
    ``dequantize(*quantize_weight(w, layout, ...), layout)`` equals ``fake_quantize(w, layout, ...)``."""
    with torch.no_grad():
        scales = weight_scales(w, layout, max_scale, block)
        full = _expand_blocks(scales, tuple(w.shape), block) if layout == "block" else scales
        x = torch.clamp(w.float() / full + v, -FP8_E4M3.max, FP8_E4M3.max)
        return cast(x, FP8_E4M3).to(torch.float8_e4m3fn), scales


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    layout: str,
    block: tuple[int, int] = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights from ``float8_e4m3fn`` ``[N, K]`` and ``weight_scales``-shaped scales, in float32, cast once."""
    full = _expand_blocks(scales.float(), tuple(q.shape), block) if layout == "block" else scales.float()
    return (q.float() * full).to(dtype)
