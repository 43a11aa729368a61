"""Dispatch from a :class:`~quantize.scheme.Scheme` to the numerics module that implements its weight rule.

One small registry, so that tuning (signround), the final integer/FP form (``QuantizedWeight``), export and
loading all reach the one implementation of each rule without a branch per data type in any of them:

====================  ======================  ==================================================================
rule                  numerics module         final form ``(q, scales, zeros, extra)``
====================  ======================  ==================================================================
``int``               ``numerics``            unsigned codes uint8 [N, K], float16 scales [N, G], uint8 zeros [N, G]
``int_absmax``        ``numerics_int8``       signed int8 [N, K], float32 scales [N, 1] (W8A8, W4A4)
``mx_fp``             ``numerics_mx``         packed FP4 uint8 [N, K/2] or float8 [N, K], E8M0 codes uint8 [N, K/32]
``nv_fp``             ``numerics_nvfp4``      packed FP4 uint8 [N, K/2], float8 scales [N, K/16];
                                              extra ``weight_global_scale`` float32 [1]
``fp8``               ``numerics_fp8``        float8 [N, K], float32 scales [N, 1] / [1] / [N/128, K/128]
====================  ======================  ==================================================================

``zeros`` is an empty uint8 tensor for the symmetric FP and absmax rules. ``extra`` also carries the
activations' calibrated scales (``input_global_scale``, ``input_scale``) that tuning fixed for the layer.

``row_local`` rules (int, int_absmax, mx_fp) quantize each row on its own, so stacked weights' final form
splits by rows.

SignRound's parameters per layer: ``v`` (the weight's shape, the rounding offset added after the division
by the scale and before the cast/round) and clipping factors of ``clip_shape``: ``min_scale`` and
``max_scale`` for ``int`` (the range's two ends), ``max_scale`` only for the symmetric rules (it moves the
MX exponent, the NVFP4 group scale, the FP8 / absmax scale); their ``min_scale`` gets no gradient.
``ctx`` holds what is fixed before tuning: NVFP4's weight global scale (``global_scale``).
"""

from __future__ import annotations

import torch

from quantize import numerics, numerics_fp8, numerics_int8, numerics_mx, numerics_nvfp4
from quantize.scheme import FP8_BLOCK, Scheme



def _no_zeros() -> torch.Tensor:
    """The symmetric rules' ``zeros``: empty (a new tensor per layer: safetensors refuses shared storage)."""
    return torch.zeros(0, dtype=torch.uint8)


def rule_name(scheme: Scheme) -> str:
    if scheme.data_type == "int":
        return "int" if not scheme.quantizes_activations else "int_absmax"
    return {"mx_fp": "mx_fp", "nv_fp": "nv_fp", "fp": "fp8"}[scheme.data_type]


class _Int:
    tunes_min = True
    row_local = True
    search_grid = torch.linspace(0.3, 1.0, 29).tolist()

    @staticmethod
    def clip_shape(scheme, n, k):
        return (n, 1 if scheme.group_size == -1 else k // scheme.group_size)

    @staticmethod
    def fake_quantize(w, scheme, v, min_scale, max_scale, ctx):
        return numerics.fake_quantize(w, scheme.bits, scheme.group_size, scheme.sym, v, min_scale, max_scale)

    @staticmethod
    def quantize(w, scheme, v, min_scale, max_scale, ctx):
        return (*numerics.quantize_weight(w, scheme.bits, scheme.group_size, scheme.sym, v, min_scale, max_scale), {})

    @staticmethod
    def dequantize(q, scales, zeros, extra, scheme, dtype):
        return numerics.dequantize(q, scales, zeros, dtype)


class _IntAbsmax:
    tunes_min = False
    row_local = True
    search_grid = None

    @staticmethod
    def clip_shape(scheme, n, k):
        return (n, 1)

    @staticmethod
    def fake_quantize(w, scheme, v, min_scale, max_scale, ctx):
        return numerics_int8.fake_quantize(w, scheme.bits, v, max_scale)

    @staticmethod
    def quantize(w, scheme, v, min_scale, max_scale, ctx):
        q, scale = numerics_int8.quantize_weight(w, scheme.bits, v, max_scale)
        return q, scale, _no_zeros(), {}

    @staticmethod
    def dequantize(q, scales, zeros, extra, scheme, dtype):
        return numerics_int8.dequantize(q, scales, dtype)


def _mx_fmt(scheme):
    return numerics_mx.MXFP4 if scheme.bits == 4 else numerics_mx.MXFP8


class _MX:
    tunes_min = False
    row_local = True
    # The factor only matters through floor(log2(amax * factor)): one exponent down, the same, one up (which
    # stops clipping the largest weights where amax / 2**e reaches past the element's maximum).
    search_grid = (0.5, 1.0, 2.0)

    @staticmethod
    def clip_shape(scheme, n, k):
        return (n, k // scheme.group_size)

    @staticmethod
    def fake_quantize(w, scheme, v, min_scale, max_scale, ctx):
        return numerics_mx.fake_quantize(w, _mx_fmt(scheme), v, max_scale, scheme.group_size)

    @staticmethod
    def quantize(w, scheme, v, min_scale, max_scale, ctx):
        data, codes = numerics_mx.quantize_weight(w, _mx_fmt(scheme), v, max_scale, scheme.group_size)
        return data, codes, _no_zeros(), {}

    @staticmethod
    def dequantize(q, scales, zeros, extra, scheme, dtype):
        return numerics_mx.dequantize(q, scales, _mx_fmt(scheme), dtype)


class _NV:
    tunes_min = False
    row_local = False  # one global scale per tensor
    # The group scale is rounded to FP8 E4M3 after the factor: a factor a little above 1 can land nearer
    # (AutoRound's optimized RTN searches 0.50-1.51 in steps of 0.01; E4M3's steps are 6-12%, so 0.02 is enough).
    search_grid = [i / 50 for i in range(25, 76)]

    @staticmethod
    def clip_shape(scheme, n, k):
        return (n, k // scheme.group_size)

    @staticmethod
    def fake_quantize(w, scheme, v, min_scale, max_scale, ctx):
        return numerics_nvfp4.fake_quantize(w, _global_scale(w, ctx), v, max_scale, scheme.group_size)

    @staticmethod
    def search_candidates(w, scheme, ctx):
        return numerics_nvfp4.distinct_factors(w, _global_scale(w, ctx), _NV.search_grid, scheme.group_size)

    @staticmethod
    def quantize(w, scheme, v, min_scale, max_scale, ctx):
        gs = _global_scale(w, ctx)
        packed, scales = numerics_nvfp4.quantize_weight(w, gs, v, max_scale, scheme.group_size)
        return packed, scales, _no_zeros(), {"weight_global_scale": gs.detach().float().reshape(1).cpu().clone()}

    @staticmethod
    def dequantize(q, scales, zeros, extra, scheme, dtype):
        return numerics_nvfp4.dequantize(q, scales, extra["weight_global_scale"].to(q.device), dtype)


def _global_scale(w, ctx) -> torch.Tensor:
    """NVFP4's global scale: fixed before tuning by the caller (fused layers share one), else the weight's own."""
    gs = (ctx or {}).get("global_scale")
    return numerics_nvfp4.weight_global_scale(w) if gs is None else gs


def fp8_layout(scheme: Scheme) -> str:
    return {-1: "channel", 0: "tensor", FP8_BLOCK: "block"}[scheme.group_size]


class _FP8:
    tunes_min = False
    row_local = False  # per-tensor and 128x128-block layouts span rows
    search_grid = None

    @staticmethod
    def clip_shape(scheme, n, k):
        layout = fp8_layout(scheme)
        if layout == "channel":
            return (n, 1)
        if layout == "tensor":
            return (1,)
        b = numerics_fp8.BLOCK
        return (-(-n // b[0]), -(-k // b[1]))

    @staticmethod
    def fake_quantize(w, scheme, v, min_scale, max_scale, ctx):
        return numerics_fp8.fake_quantize(w, fp8_layout(scheme), v, max_scale)

    @staticmethod
    def quantize(w, scheme, v, min_scale, max_scale, ctx):
        q, scales = numerics_fp8.quantize_weight(w, fp8_layout(scheme), v, max_scale)
        return q, scales, _no_zeros(), {}

    @staticmethod
    def dequantize(q, scales, zeros, extra, scheme, dtype):
        return numerics_fp8.dequantize(q, scales, fp8_layout(scheme), dtype=dtype)


RULES = {"int": _Int, "int_absmax": _IntAbsmax, "mx_fp": _MX, "nv_fp": _NV, "fp8": _FP8}


def rule(scheme: Scheme):
    return RULES[rule_name(scheme)]


def fake_quantize(w, scheme: Scheme, v=0.0, min_scale=1.0, max_scale=1.0, ctx: dict | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` in float32, differentiable in ``v`` and the clipping factors."""
    return rule(scheme).fake_quantize(w, scheme, v, min_scale, max_scale, ctx)


def quantize_weight(w, scheme: Scheme, v=0.0, min_scale=1.0, max_scale=1.0, ctx: dict | None = None):
    """Final form ``(q, scales, zeros, extra)``; dequantizing it gives ``fake_quantize``'s weight exactly."""
    with torch.no_grad():
        return rule(scheme).quantize(w, scheme, v, min_scale, max_scale, ctx)


def dequantize(q, scales, zeros, extra: dict, scheme: Scheme, dtype=torch.float32) -> torch.Tensor:
    return rule(scheme).dequantize(q, scales, zeros, extra, scheme, dtype)


def clip_shape(scheme: Scheme, n: int, k: int) -> tuple[int, ...]:
    return rule(scheme).clip_shape(scheme, n, k)


def row_local(scheme: Scheme) -> bool:
    """Whether the rule quantizes each row of a weight on its own, with nothing fixed per tensor: weights
    stacked along their rows (a MoE layer's experts) then quantize as each would alone."""
    return rule(scheme).row_local


def search_grid(scheme: Scheme) -> list[float] | None:
    """The clipping factors a grid search tries for this rule (per row group), or None: not searched."""
    return rule(scheme).search_grid


def search_candidates(w: torch.Tensor, scheme: Scheme, ctx: dict | None = None) -> list[torch.Tensor]:
    """Per-group factor tensors ``clip_shape`` for a search over the rule's grid, ascending: the grid itself,
    or, where the rule rounds what the factor moves (NVFP4's FP8 group scale), one factor per distinct
    outcome (the same search result from fewer passes)."""
    candidates = getattr(rule(scheme), "search_candidates", None)
    if candidates is not None:
        return candidates(w, scheme, ctx)
    shape = clip_shape(scheme, *w.shape)
    return [torch.full(shape, r, device=w.device) for r in search_grid(scheme)]
