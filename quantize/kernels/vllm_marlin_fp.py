"""MXFP4, NVFP4 and MXFP8 layers on vLLM's Marlin kernels, offered where vLLM is loaded on a CUDA GPU.

GPUs before Blackwell have no FP4 or MX tensor cores; on them vLLM serves these schemes weight-only
through Marlin (its ``MarlinNvFp4LinearKernel``, ``MarlinMxFp4LinearKernel``, ``MarlinMxfp8LinearKernel``):
the codes and group scales repacked once, dequantized in registers inside a tensor-core GEMM with 16-bit
activations, 4 or 8 bits a weight read from memory instead of 16. This kernel hands our auto_round
checkpoint's tensors (the compressed-tensors layout, quantize.fp_layout) to the same vLLM functions those
classes call, so the plugin serves an auto_round FP checkpoint as fast as vLLM serves the llm_compressor
export of the same model.

Weight-only, like vLLM's path: for the schemes that also quantize activations (MXFP4, NVFP4, MXFP8) the
input stays 16-bit, which the log says once; ``fp_emulate`` (forced by name) keeps the scheme's
activation rounding. Fused layers (q/k/v, gate/up) whose NVFP4 parts have different global scales (ours
and AutoRound's share one; other writers may not) run under the first part's and rescale the other parts'
output columns; vLLM's own path takes one global scale for the whole layer.
"""

from __future__ import annotations

import logging
import sys

import torch

from quantize import weight_rules
from quantize.kernels.dispatch import FPLinearSpec, register_kernel

log = logging.getLogger("quantize.kernels")

ACT_DTYPES = (torch.bfloat16, torch.float16)
FORMS = (("mx_fp", 4), ("mx_fp", 8), ("nv_fp", 4))  # (rule, bits); their group sizes (32, 32, 16) fixed by Scheme
_warned: set[str] = set()


def _utils():
    """vLLM's Marlin FP helpers (module-level functions of vLLM 0.26 and 0.32 alike)."""
    from vllm.model_executor.layers.quantization.utils import marlin_utils, marlin_utils_fp4, marlin_utils_fp8

    return marlin_utils, marlin_utils_fp4, marlin_utils_fp8


def _form(spec: FPLinearSpec) -> tuple[str, int]:
    return weight_rules.rule_name(spec.scheme), spec.scheme.bits


def _holder(spec: FPLinearSpec, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The attributes vLLM's ``prepare_*_for_marlin`` read from a linear layer, on a bare module."""
    layer = torch.nn.Module()
    for name, t in tensors.items():
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    layer.input_size_per_partition, layer.output_size_per_partition = spec.in_features, spec.out_features
    layer.params_dtype = spec.act_dtype
    return layer


def _nvfp4_scalars(parts: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NVFP4's weight multiplier ``1 / global_scale`` (what vLLM hands Marlin) from the first part, and
    per output column the factor that turns it into each part's own (None when all parts share it)."""
    mult = [1.0 / p["weight_global_scale"].float().reshape(()) for p in parts]
    if all(torch.equal(m, mult[0]) for m in mult):
        return mult[0], None
    rows = [len(p["weight_scale"]) for p in parts]
    return mult[0], torch.cat([(m / mult[0]).expand(n) for m, n in zip(mult, rows)])


@register_kernel("vllm_marlin_fp")
class VllmMarlinFPKernel:
    # Forced by name only (``kernel: "vllm_marlin_fp"``): its first run on the H200 (vLLM 0.26, 2026-12-05,
    # tests/test_cuda.py) faulted with an illegal memory access at M = 1 (NVFP4A16, bf16); until that is
    # understood the plugin's FP layers keep the emulation (priority 0) by default.
    priority = -1
    spec_type = FPLinearSpec

    @staticmethod
    def unsupported(spec: FPLinearSpec, device: torch.device) -> str | None:
        if _form(spec) not in FORMS:
            return "computes MXFP4, MXFP8 and NVFP4 layers"
        if device.type != "cuda":
            return "needs a CUDA device"
        if spec.act_dtype not in ACT_DTYPES:
            return f"takes bf16 or fp16 activations, not {spec.act_dtype}"
        if sys.modules.get("vllm._custom_ops") is None:
            return "vLLM is not loaded in this process"
        if torch.cuda.get_device_capability(device) < (7, 5):
            return "Marlin needs compute capability 7.5 or newer"
        return None

    @staticmethod
    def prepare(spec: FPLinearSpec, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        marlin, fp4, fp8 = _utils()
        rule, bits = _form(spec)
        if spec.scheme.quantizes_activations and spec.scheme.name not in _warned:
            _warned.add(spec.scheme.name)
            log.warning("%s layers run weight-only on vLLM's Marlin kernel: activations stay %s, as in vLLM's own "
                        "path on GPUs without FP4/MX tensor cores (kernel 'fp_emulate' keeps the scheme's "
                        "activation rounding, at 16-bit speed)", spec.scheme.name, str(spec.act_dtype).split(".")[-1])
        weight = torch.cat([p["weight_packed" if bits == 4 else "weight"] for p in parts])
        tensors = {"weight": weight, "weight_scale": torch.cat([p["weight_scale"] for p in parts])}
        column_scale = None
        if rule == "nv_fp":
            tensors["weight_global_scale"], column_scale = _nvfp4_scalars(parts)
        layer = _holder(spec, tensors)
        # vLLM reads the activation dtype from the default dtype in its MXFP8 path (set while it loads a model)
        default = torch.get_default_dtype()
        torch.set_default_dtype(spec.act_dtype)
        try:
            (fp8.prepare_mxfp8_layer_for_marlin if bits == 8 else fp4.prepare_fp4_layer_for_marlin)(layer)
        finally:
            torch.set_default_dtype(default)
        state = {"weight": layer.weight.data, "weight_scale": layer.weight_scale.data,
                 "workspace": marlin.marlin_make_workspace_new(weight.device)}
        if rule == "nv_fp":
            state["weight_global_scale"] = layer.weight_global_scale.data
        if column_scale is not None:
            state["column_scale"] = column_scale.to(weight.device, spec.act_dtype)
        return state

    @staticmethod
    def apply(spec: FPLinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        _, fp4, fp8 = _utils()
        args = dict(input=x, weight=state["weight"], weight_scale=state["weight_scale"], workspace=state["workspace"],
                    size_n=spec.out_features, size_k=spec.in_features)
        if spec.scheme.bits == 8:
            out = fp8.apply_mxfp8_marlin_linear(**args)
        else:
            out = fp4.apply_fp4_marlin_linear(**args, weight_global_scale=state.get("weight_global_scale"))
        if "column_scale" in state:
            out = out * state["column_scale"]
        return out if bias is None else out + bias.to(out.dtype)
