"""FP8_STATIC layers on FP8 tensor cores (quantize.kernels.fp8_scaled_mm) and the FP kernels' dispatch.

torch runs ``_scaled_mm`` on the CPU too, so the kernel's arithmetic is checked here against exact
arithmetic on the same FP8 codes: one bf16 rounding of float32 sums. The emulation (fp_emulate) rounds the
weight and the input to bf16 first; both are compared. Picking the kernel on a GPU is tests/test_cuda.py's.
"""

from __future__ import annotations

import pytest
import torch

from quantize import numerics_act, numerics_fp8
from quantize.kernels import KERNELS, FPLinearSpec, LinearSpec, select_kernel
from quantize.kernels.fp8_scaled_mm import FP8ScaledMMKernel
from quantize.kernels.fp_emulate import FPEmulateKernel
from quantize.scheme import get_scheme

FP8_STATIC = get_scheme("FP8_STATIC")
CPU = torch.device("cpu")


def _layer(n: int, k: int, seed: int = 0, input_amax: float = 6.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    weight, weight_scale = numerics_fp8.quantize_weight(w, "channel")
    return {"weight": weight, "weight_scale": weight_scale, "input_scale": numerics_act.fp8_static_scale(input_amax)}


def _exact(x: torch.Tensor, parts: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """float64 products of the codes the scheme defines, both scales applied: no rounding but the codes'."""
    s = max(p["input_scale"].item() for p in parts)
    xq = numerics_fp8.codes(x.reshape(-1, x.shape[-1]), torch.tensor(s)).double() * s
    w = torch.cat([p["weight"].double() * p["weight_scale"].double().reshape(-1, 1) for p in parts])
    return (xq @ w.t()).reshape(*x.shape[:-1], -1)


def test_codes_are_what_the_static_rule_rounds_to():
    x = torch.randn(64, 96) * 5
    s = torch.tensor(0.013)
    assert torch.equal(numerics_fp8.codes(x, s).float() * s, numerics_act.fp8_static(x, s))


@pytest.mark.parametrize("m", [1, 7, 33])
def test_scaled_mm_is_exact_arithmetic_rounded_once(m):
    parts = [_layer(64, 128)]
    spec = FPLinearSpec(FP8_STATIC, 128, 64, torch.bfloat16)
    x = (torch.randn(2, m, 128) * 3).to(torch.bfloat16)
    bias = torch.randn(64).to(torch.bfloat16)
    out = FP8ScaledMMKernel.apply(spec, FP8ScaledMMKernel.prepare(spec, parts), x, bias)
    exact = _exact(x, parts) + bias.double()
    assert out.shape == (2, m, 64) and out.dtype == torch.bfloat16
    # one bf16 rounding of the float32 sums (2^-8 relative), plus the bias's own addition in bf16
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()
    emulated = FPEmulateKernel.apply(spec, FPEmulateKernel.prepare(spec, parts), x, bias)
    assert (out.double() - exact).norm() <= (emulated.double() - exact).norm()
    assert (emulated.double() - exact).norm() / exact.norm() < 1e-2


def test_fused_parts_share_the_widest_input_scale():
    parts = [_layer(32, 64, seed=1, input_amax=2.0), _layer(48, 64, seed=2, input_amax=9.0), _layer(16, 64, seed=3, input_amax=4.0)]
    spec = FPLinearSpec(FP8_STATIC, 64, 96, torch.bfloat16)
    state = FP8ScaledMMKernel.prepare(spec, parts)
    assert state["input_scale"].item() == parts[1]["input_scale"].item() and state["weight_scale"].shape == (1, 96)
    x = (torch.randn(5, 64) * 3).to(torch.bfloat16)
    exact = _exact(x, parts)
    out = FP8ScaledMMKernel.apply(spec, state, x, None)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    emulated = FPEmulateKernel.apply(spec, FPEmulateKernel.prepare(spec, parts), x, None)
    assert (emulated.double() - exact).norm() / exact.norm() < 1e-2  # the emulation's parts merged alike


def test_dispatch_keeps_fp_and_integer_kernels_apart():
    fp = FPLinearSpec(FP8_STATIC, 128, 64, torch.bfloat16)
    assert select_kernel(fp, CPU) is FPEmulateKernel  # no FP8 units on a CPU
    assert select_kernel(LinearSpec(4, 128, True, "gptq", 128, 64, torch.bfloat16), CPU).name != "fp_emulate"
    # a forced integer kernel leaves a mixed checkpoint's FP layers to the table, and the reverse
    assert select_kernel(fp, CPU, force="torch") is FPEmulateKernel
    assert select_kernel(LinearSpec(4, 128, True, "gptq", 128, 64), CPU, force="fp_emulate").name == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        select_kernel(fp, CPU, force="fp8_scaled_mm")
    with pytest.raises(ValueError, match="unknown kernel 'fp9'"):
        select_kernel(fp, CPU, force="fp9")


@pytest.mark.parametrize("scheme, dtype, n, why", [
    ("MXFP4", torch.bfloat16, 64, "FP8_STATIC"),
    ("FP8_BLOCK", torch.bfloat16, 64, "FP8_STATIC"),
    ("FP8_STATIC", torch.float16, 64, "bf16 only"),
    ("FP8_STATIC", torch.bfloat16, 40, "divisible by 16"),
])
def test_scaled_mm_says_what_it_cannot_run(scheme, dtype, n, why):
    assert why in KERNELS["fp8_scaled_mm"].unsupported(FPLinearSpec(get_scheme(scheme), 128, n, dtype), CPU)
