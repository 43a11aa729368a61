"""Activation fake-quantization: the input of a quantized linear layer as the serving kernel sees it, for
the block forward during tuning and for exact CPU emulation of W8A8 / W4A4 / FP8 / MX / NVFP4 checkpoints.

Every function takes ``x`` ``[..., K]`` (any leading shape, any float dtype), computes in float32 and
returns ``x``'s dtype. Groups run along ``K``, per token.

- ``fp8_static``: FP8 E4M3, one calibrated scale for the tensor (FP8_STATIC's ``input_scale``).
- ``fp8_group_dynamic``: FP8 E4M3, a scale per token and 128 channels (FP8_BLOCK, DeepSeek's 1x128).
- ``mx_dynamic``: MXFP4 / MXFP8, a power-of-two scale per token and 32 channels (``numerics_mx``'s rule,
  AutoRound's and the OCP spec's floor; compressed-tensors' and vLLM's reference MX activation quantizers
  take the next power of two when the amax's mantissa is >= 1.75; that matters only for native W4A4 MX
  serving, sm100, where emulating them would need its own function).
- ``nvfp4``: FP4 with FP8 scales per token and 16 channels under a static global scale
  (``input_global_scale``, from the calibrated amax: ``numerics_nvfp4.global_scale``).
- ``int_per_token``: signed int8 / int4 per token, dynamic (``numerics_int8``'s rule).

Gradients: ``fp8_static`` is straight-through inside its clipping range and differentiable in its scale,
so SignRound can tune the static clipping factor (``scale = numerics_fp8.scale_from_amax(amax,
act_max_scale)``), as AutoRound does for static activations. The dynamic rules are straight-through as a
whole (identity backward): their scales follow ``x`` and nothing in them is tuned. (AutoRound lets the
gradient also flow through the dynamic scale's amax, to one element per group; we treat the scale as a
statistic of the batch.)
"""

from __future__ import annotations

import torch

from . import numerics_int8, numerics_mx, numerics_nvfp4
from .numerics import to_groups
from .numerics_fp import FP8_E4M3, FPFormat, cast, ceil_pow2
from .numerics_fp8 import qdq as fp8_qdq
from .numerics_fp8 import scale_from_amax

FP8_ACT_GROUP = 128
# vLLM's per-token-group FP8 quantization floors the group amax here. The weights' (and AutoRound's) scale
# floor 1/(448*512) would give groups with amax below 1/512 a larger scale than vLLM computes; emulation
# follows the engine that serves the checkpoint.
FP8_GROUP_EPS = 1e-10


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` as ``[tokens, K]`` float32, detached (dynamic rules compute on values only)."""
    return x.detach().float().reshape(-1, x.shape[-1])


def _straight_through(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``xq`` (``[tokens, K]``) forward in ``x``'s shape and dtype, identity backward."""
    xq = xq.reshape(x.shape).to(x.dtype)
    return xq + (x - x.detach()) if x.requires_grad else xq


def fp8_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``scale * fp8(clamp(x / scale, ±448))`` with a given (calibrated) per-tensor scale."""
    return fp8_qdq(x, torch.as_tensor(scale, dtype=torch.float32)).to(x.dtype)


def fp8_static_scale(amax: torch.Tensor | float, max_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The calibrated ``input_scale``: ``amax * max_scale / 448`` (float32, floored as weights' scales)."""
    return scale_from_amax(torch.as_tensor(amax, dtype=torch.float32), max_scale)


def fp8_group_dynamic(x: torch.Tensor, group_size: int = FP8_ACT_GROUP, ue8m0: bool = False) -> torch.Tensor:
    """Per token and ``group_size`` channels: ``scale = max(amax, 1e-10) / 448``, ``scale * fp8(x / scale)``,
    vLLM's ``per_token_group_quant_fp8``. ``ue8m0`` rounds each scale up to a power of two, as vLLM does
    with ``VLLM_USE_DEEP_GEMM_E8M0`` (to measure what that costs)."""
    xg = to_groups(_rows(x), group_size)
    scale = xg.abs().amax(dim=-1, keepdim=True).clamp(min=FP8_GROUP_EPS) / FP8_E4M3.max
    if ue8m0:
        scale = ceil_pow2(scale)
    xq = cast(xg / scale, FP8_E4M3) * scale
    return _straight_through(x, xq)


def mx_dynamic(x: torch.Tensor, fmt: FPFormat, group_size: int = numerics_mx.MX_GROUP) -> torch.Tensor:
    """MX quantize-dequantize per token and 32 channels (``fmt``: ``numerics_mx.MXFP4`` or ``MXFP8``)."""
    return _straight_through(x, numerics_mx.fake_quantize(_rows(x), fmt, group_size=group_size))


def nvfp4(
    x: torch.Tensor, gscale: torch.Tensor | float, group_size: int = numerics_nvfp4.NVFP4_GROUP
) -> torch.Tensor:
    """NVFP4 quantize-dequantize per token and 16 channels under the static global scale ``gscale``."""
    return _straight_through(x, numerics_nvfp4.fake_quantize(_rows(x), gscale, group_size=group_size))


def int_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Signed symmetric integers per token, dynamic: ``scale = amax / (2**(bits-1) - 1)``."""
    return _straight_through(x, numerics_int8.fake_quantize(_rows(x), bits))
