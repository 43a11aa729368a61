"""NVFP4: FP4 E2M1 elements in groups of 16, an FP8 E4M3 scale per group, one float32 global scale.

A layer (or a set of fused layers, below) has a global scale ``gs = 448 * 6 / amax`` that maps the
tensor's largest magnitude to the largest FP8 scale times the largest FP4 value. Per group of 16:

    s     = fp8(clamp(gs * (amax_group * max_scale / 6), 2**-9, 448))     stored as float8_e4m3fn
    w_hat = (s / gs) * fp4(clamp(w / (s / gs) + v, ±6))                   elements packed two per byte

``max_scale`` is SignRound's clipping factor (it moves the group scale); ``v`` its rounding offset,
added after the division by the scale and before the cast to the FP grid. The global scale is fixed
before tuning (from the untuned weight) and is an argument here, never recomputed inside.

Fused layers: q/k/v and gate/up run as one GEMM in vLLM, which needs one global scale for the fused
weight. They share the smallest of their global scales (AutoRound's and llm-compressor's rule), i.e. the
one from the largest amax: ``fused_global_scale(amaxes)``.

The arithmetic is compressed-tensors' (``s / gs`` computed once; ``w / (s / gs)``; ``amax / 6`` then times
``gs``), so compressed-tensors' compressor, given our scales, writes our bytes, and its decompressor
gives ``dequantize``'s weights exactly (tested).
Intended differences from AutoRound 0.16.1's ``nv_fp4``, which multiplies by reciprocals instead
(``2688 * (1/amax)``, ``x * (1/(s/gs))``, ``q * (1/(1/(s/gs)))``): its global scale and weights may differ
from ours in the last bit, and a code may flip where ``w / (s / gs)`` sits on a rounding tie (1 code in
524288 on random weights). Its group scale may round to 0 in FP8 for a group far below
the tensor's amax, which zeroes that group; ours is floored at FP8's smallest subnormal ``2**-9``, so no
stored scale is 0 and no loader divides by zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .numerics import to_groups
from .numerics_fp import FP4_E2M1, FP8_E4M3, cast, cast_ste, decode, encode, pack_fp4, round_to_grid_, unpack_fp4

NVFP4_GROUP = 16
GLOBAL_NUMERATOR = FP8_E4M3.max * FP4_E2M1.max  # 2688.0
MIN_GROUP_SCALE = 2.0**-9  # FP8 E4M3's smallest subnormal


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``448 * 6 / amax`` as a float32 scalar tensor; ``1.0`` for an all-zero tensor (compressed-tensors'
    fallback), so a zero layer neither divides by zero nor wins a fused minimum."""
    amax = torch.as_tensor(amax).detach().float().reshape(())
    if amax <= 0:
        return torch.tensor(1.0)
    return torch.tensor(GLOBAL_NUMERATOR, dtype=torch.float32) / amax


def weight_global_scale(w: torch.Tensor) -> torch.Tensor:
    """The global scale of one weight, from its untuned values."""
    return global_scale(w.detach().float().abs().amax())


def fused_global_scale(amaxes: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """One global scale for fused parts (q/k/v, gate/up) from each part's amax: the minimum of the parts'
    global scales, which is the global scale of the largest amax (division is monotone, so exactly)."""
    return global_scale(max(float(torch.as_tensor(a).float()) for a in amaxes))


def group_scales(
    wg: torch.Tensor, gscale: torch.Tensor, max_scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """FP8 group scales ``[N, G]`` (float32 values on the E4M3 grid) of grouped weights ``[N, G, 16]``;
    differentiable in ``max_scale`` through a straight-through FP8 cast."""
    return cast_ste(_unrounded_scales(wg.abs().amax(dim=-1), gscale, max_scale), FP8_E4M3)


def _unrounded_scales(amax: torch.Tensor, gscale: torch.Tensor, max_scale: torch.Tensor | float) -> torch.Tensor:
    return (gscale * (amax * max_scale / FP4_E2M1.max)).clamp(MIN_GROUP_SCALE, FP8_E4M3.max)


@torch.no_grad()
def distinct_factors(w: torch.Tensor, gscale: torch.Tensor | float, grid: Sequence[float], group_size: int = NVFP4_GROUP) -> list[torch.Tensor]:
    """Per-group factors ``[N, K // 16]`` standing for every distinct quantization a search over ``grid``
    (ascending) can give: a factor acts only through the group scale after its FP8 rounding, so adjacent
    factors often give the same scale and the same weights. The k-th tensor holds, per group, the first
    factor of the k-th distinct scale (groups with fewer repeat their first). A search that keeps the
    first strictly better error over these picks what it would over the whole grid, in ~14 passes instead
    of 51."""
    amax = to_groups(w.float(), group_size).abs().amax(dim=-1)
    gscale = torch.as_tensor(gscale, dtype=torch.float32)
    factors = torch.tensor(list(grid), dtype=torch.float32, device=w.device)
    # every group's scale at every factor [N, G, R], as fake_quantize computes it; E4M3 codes of positive
    # values ascend with the value, and a grid step moves the scale by at most one code
    codes = _unrounded_scales(amax.unsqueeze(-1), gscale, factors).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    count = int((codes[..., -1] - codes[..., 0]).max()) + 1
    wanted = codes[..., :1] + torch.arange(count, dtype=torch.int32, device=w.device)
    first = torch.searchsorted(codes.contiguous(), wanted.contiguous())  # [N, G, count]: where each code starts
    first = torch.where(first < len(grid), first, 0)
    return list(factors[first].unbind(-1))


def _qdq_groups(w, gscale, v, max_scale, group_size):
    """FP4 grid values ``[N, G, g]`` (straight-through), FP8 group scales ``[N, G]``, effective scales ``[N, G, 1]``."""
    wg = to_groups(w.float(), group_size)
    if isinstance(max_scale, torch.Tensor):
        max_scale = max_scale.reshape(wg.shape[:-1])
    gscale = torch.as_tensor(gscale, dtype=torch.float32)
    s = group_scales(wg, gscale, max_scale)
    eff = (s / gscale).unsqueeze(-1)
    if isinstance(v, torch.Tensor):
        x = torch.clamp(wg / eff + v.reshape(wg.shape), -FP4_E2M1.max, FP4_E2M1.max)
    else:
        x = (wg / eff + v if v else wg / eff).clamp_(-FP4_E2M1.max, FP4_E2M1.max)
    if torch.is_grad_enabled() and x.requires_grad:
        return cast_ste(x, FP4_E2M1), s, eff
    # nothing to differentiate (activations, the search, the final codes): x is ours to round in place
    return round_to_grid_(x, FP4_E2M1), s, eff


def fake_quantize(
    w: torch.Tensor,
    gscale: torch.Tensor | float,
    v: torch.Tensor | float = 0.0,
    max_scale: torch.Tensor | float = 1.0,
    group_size: int = NVFP4_GROUP,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` (float32) under a fixed global scale, differentiable in ``v``
    ``[N, K]`` and ``max_scale`` ``[N, K // 16]`` (or scalars). Also the activation rule (``v = 0``)."""
    q, _, eff = _qdq_groups(w, gscale, v, max_scale, group_size)
    return (q * eff).reshape(w.shape)


def quantize_weight(
    w: torch.Tensor,
    gscale: torch.Tensor | float,
    v: torch.Tensor | float = 0.0,
    max_scale: torch.Tensor | float = 1.0,
    group_size: int = NVFP4_GROUP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final form of ``w`` ``[N, K]``: FP4 codes packed ``[N, K // 2]`` (uint8, compressed-tensors' nibble
    order) and group scales ``[N, K // 16]`` (float8_e4m3fn). The global scale is the caller's (stored as
    ``weight_global_scale``). ``dequantize(*quantize_weight(w, gs, ...), gs)`` equals ``fake_quantize``."""
    with torch.no_grad():
        q, s, _ = _qdq_groups(w, gscale, v, max_scale, group_size)
        packed = pack_fp4(encode(q.reshape(w.shape), FP4_E2M1))
        return packed, cast(s, FP8_E4M3).to(torch.float8_e4m3fn)


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weights ``[N, K]`` from packed codes, FP8 group scales ``[N, G]`` and the global scale, as
    compressed-tensors computes them: ``q * (s / gs)`` in float32, cast once."""
    q = decode(unpack_fp4(packed), FP4_E2M1)
    n, k = q.shape
    groups = scales.shape[-1]
    eff = scales.float() / torch.as_tensor(gscale, dtype=torch.float32)
    return (q.reshape(n, groups, k // groups) * eff.unsqueeze(-1)).reshape(n, k).to(dtype)
