"""SGLang's own Marlin kernel for the layers it applies to: symmetric 4/8-bit weights in the GPTQ layout
(SGLang's uint4b8 / uint8b128 types: code minus 8 or 128, which is our symmetric zero point), on CUDA, with
float16 / bfloat16 activations, shapes Marlin tiles (outputs a multiple of 64, inputs of 128, whole groups
of 32/64/128 or per-channel). Everything else computes through quantize.kernels.

Only pieces that SGLang 0.5.17 through 0.5.21 all have are used: ``sglang.srt.layers.quantization.marlin_utils``
(support checks, workspace, scale permutation, ``apply_gptq_marlin_linear``) and the repack op
``sglang.kernels.ops.quantization.gptq_marlin_repack`` (a JIT kernel in those releases; older SGLang had it
in ``sgl_kernel``). The layer's ``qweight`` and ``scales`` are replaced by Marlin's tiled forms after loading.
"""

from __future__ import annotations

import importlib
import logging

import torch

from quantize.scheme import Scheme

logger = logging.getLogger(__name__)

_REPACK_MODULES = ("sglang.kernels.ops.quantization.gptq_marlin_repack", "sgl_kernel")


def _repack_op():
    for name in _REPACK_MODULES:
        try:
            op = getattr(importlib.import_module(name), "gptq_marlin_repack", None)
        except Exception:  # noqa: BLE001  (sgl_kernel raises more than ImportError where its library does not load)
            op = None
        if op is not None:
            return op
    return None


class SglangMarlin:
    """Marlin for one layer: ``process_weights_after_loading(layer)`` tiles the checkpoint's qweight and
    permutes its scales (already in the activation dtype); ``apply_weights(layer, x, bias)`` runs the GEMM."""

    def __init__(self, weight_type, bits: int, group_size: int, in_per_rank: int, out_per_rank: int, row_parallel: bool, repack):
        self.weight_type = weight_type
        self.bits = bits
        self.group_size = group_size
        self.in_per_rank = in_per_rank
        self.out_per_rank = out_per_rank
        self.row_parallel = row_parallel
        self.repack = repack

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from sglang.srt.layers.quantization import marlin_utils as mu

        device = layer.qweight.device
        self.is_k_full = mu.marlin_is_k_full(False, self.row_parallel)  # no activation order: always full
        self.workspace = mu.marlin_make_workspace(device)
        self.g_idx = mu.marlin_make_empty_g_idx(device)
        self.g_idx_sort_indices = mu.marlin_make_empty_g_idx(device)
        self.empty_zp = mu.marlin_make_empty_g_idx(device)
        qweight = self.repack(
            layer.qweight.data.contiguous(), perm=self.g_idx_sort_indices, size_k=self.in_per_rank,
            size_n=self.out_per_rank, num_bits=self.bits,
        )
        scales = mu.marlin_permute_scales(
            layer.scales.data.contiguous(), size_k=self.in_per_rank, size_n=self.out_per_rank, group_size=self.group_size,
        )
        # Plain parameters from here on (the engine's loader subclasses only matter while loading); the
        # symmetric zero point is part of Marlin's weight type, so qzeros is not needed.
        layer.qweight = torch.nn.Parameter(qweight, requires_grad=False)
        layer.scales = torch.nn.Parameter(scales, requires_grad=False)
        layer.qzeros = torch.nn.Parameter(self.empty_zp, requires_grad=False)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from sglang.srt.layers.quantization.marlin_utils import apply_gptq_marlin_linear

        return apply_gptq_marlin_linear(
            input=x, weight=layer.qweight, weight_scale=layer.scales, weight_zp=self.empty_zp, g_idx=self.g_idx,
            g_idx_sort_indices=self.g_idx_sort_indices, workspace=self.workspace, wtype=self.weight_type,
            output_size_per_partition=self.out_per_rank, input_size_per_partition=self.in_per_rank,
            is_k_full=self.is_k_full, bias=bias,
        )


def marlin_kernel(scheme: Scheme, layout: str, in_per_rank: int, out_per_rank: int, in_full: int,
                  act_dtype: torch.dtype, device: torch.device) -> SglangMarlin | None:
    """SGLang's Marlin for this layer, or None where it does not apply."""
    if device.type != "cuda" or not scheme.sym or scheme.bits not in (4, 8) or layout != "gptq":
        return None
    if act_dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from sglang.srt.layers.quantization import marlin_utils as mu
        from sglang.srt.layers.quantization.utils import get_scalar_types
    except ImportError:
        return None
    repack = _repack_op()
    if repack is None:
        return None
    _, scalar_types = get_scalar_types()
    weight_type = scalar_types.uint4b8 if scheme.bits == 4 else scalar_types.uint8b128
    if not mu.check_marlin_supported(weight_type, scheme.group_size, has_zp=False):
        return None
    ok, why = mu.check_marlin_supports_shape(out_per_rank, in_per_rank, in_full, scheme.group_size)
    if not ok:
        logger.debug("Marlin does not take this layer (%s): quantize.kernels computes it", why)
        return None
    return SglangMarlin(weight_type, scheme.bits, scheme.group_size, in_per_rank, out_per_rank, in_per_rank != in_full, repack)
