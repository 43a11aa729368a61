"""Compute for quantized linear layers (installed as ``quantize.kernels``): a dispatch table of
implementations, each taking packed checkpoint tensors and computing ``x @ W.T + b``."""

from quantize.kernels import (
    cpu_lowbit,  # noqa: F401  (a compiled CPU kernel for 2/3/4/8-bit layers of float32 models)
    cuda_gemv,  # noqa: F401  (a compiled CUDA GEMV for 4-bit layers at decode sizes)
    fp8_scaled_mm,  # noqa: F401  (FP8_STATIC layers on FP8 tensor cores, CUDA sm89+)
    fp_emulate,  # noqa: F401  (the portable path for FP / activation-quantized layers)
    humming,  # noqa: F401  (humming-kernels' GEMMs on CUDA, where installed: 2/3/4/8-bit, sym and asym)
    tinygemm,  # noqa: F401  (PyTorch core's int4 GEMM on CUDA, 4-bit layers)
    tinygemm_cpu,  # noqa: F401  (its CPU variant: 2/3/4-bit layers of bf16 models, decode)
    torch_ref,  # noqa: F401  (registers the portable path)
    vllm_cpu,  # noqa: F401  (vLLM's CPU kernel, when vLLM is loaded)
    vllm_fp8,  # noqa: F401  (vLLM's CUTLASS FP8 GEMM for FP8_STATIC layers, when vLLM is loaded on CUDA)
    vllm_marlin_fp,  # noqa: F401  (vLLM's Marlin for MXFP4 / NVFP4 / MXFP8 weights, when vLLM is loaded on CUDA)
)
from quantize.kernels.dispatch import (
    KERNELS,
    FPLinearSpec,
    LinearSpec,
    kernel_state,
    register_kernel,
    select_kernel,
)

try:  # Triton kernels where Triton is installed (CUDA; its interpreter runs them on the CPU for tests)
    from quantize.kernels import triton_gemm  # noqa: F401
except ImportError:
    pass

__all__ = ["KERNELS", "FPLinearSpec", "LinearSpec", "kernel_state", "register_kernel", "select_kernel"]
