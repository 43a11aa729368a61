"""Compute for quantized linear layers (installed as ``quantize.kernels``): a dispatch table of
implementations, each taking packed checkpoint tensors and computing ``x @ W.T + b``."""

from quantize.kernels.dispatch import KERNELS, LinearSpec, register_kernel, select_kernel
from quantize.kernels import torch_ref  # noqa: F401  (registers the portable path)

__all__ = ["KERNELS", "LinearSpec", "register_kernel", "select_kernel"]
