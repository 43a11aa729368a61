"""FP8_STATIC layers on FP8 tensor cores (quantize.kernels.fp8_scaled_mm) and the FP kernels' dispatch.

torch runs ``_scaled_mm`` on the CPU too, so the kernel's arithmetic is checked here against exact
arithmetic on the same FP8 codes: one bf16 rounding of float32 sums. The emulation (fp_emulate) rounds the
weight and the input to bf16 first; both are compared. Picking the kernel on a GPU is tests/test_cuda.py's.
"""

from __future__ import annotations

import os

import pytest
import torch

from quantize import numerics_act, numerics_fp8
from quantize.kernels import KERNELS, FPLinearSpec, LinearSpec, select_kernel
from quantize.kernels import fp8_scaled_mm
from quantize.kernels.fp8_scaled_mm import FP8ScaledMMKernel
from quantize.kernels.fp_emulate import FPEmulateKernel
from quantize.scheme import get_scheme

FP8_STATIC = get_scheme("FP8_STATIC")
CPU = torch.device("cpu")
triton_runs = pytest.mark.skipif(
    fp8_scaled_mm.fp8_triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton, and CUDA or TRITON_INTERPRET=1")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(2, m, 128, generator=g) * 3).to(torch.bfloat16)
    bias = torch.randn(64, generator=g).to(torch.bfloat16)
    products = _exact(x, parts)
    exact = products + bias.double()
    on_dev = [{k: v.to(DEV) for k, v in parts[0].items()}]  # (a GPU machine checks its CUDA path)
    x, bias = x.to(DEV), bias.to(DEV)
    out = FP8ScaledMMKernel.apply(spec, FP8ScaledMMKernel.prepare(spec, on_dev), x, bias).cpu()
    assert out.shape == (2, m, 64) and out.dtype == torch.bfloat16
    # one bf16 rounding of the float32 sums, then the bias added in bf16 (a second rounding): half an ulp
    # of each, which is not relative to the result where the bias cancels the sum
    magnitude = _exact(x.cpu().abs(), [{**parts[0], "weight": parts[0]["weight"].abs()}]) + bias.cpu().double().abs()
    assert ((out.double() - exact).abs() <= (products.abs() + exact.abs()) * 2**-8 + magnitude * 2**-12).all()
    emulated = FPEmulateKernel.apply(spec, FPEmulateKernel.prepare(spec, on_dev), x, bias).cpu()
    assert (out.double() - exact).norm() <= (emulated.double() - exact).norm()
    assert (emulated.double() - exact).norm() / exact.norm() < 1e-2


def test_fused_parts_share_the_widest_input_scale():
    parts = [_layer(32, 64, seed=1, input_amax=2.0), _layer(48, 64, seed=2, input_amax=9.0), _layer(16, 64, seed=3, input_amax=4.0)]
    spec = FPLinearSpec(FP8_STATIC, 64, 96, torch.bfloat16)
    state = FP8ScaledMMKernel.prepare(spec, parts)
    assert state["input_scale"].item() == parts[1]["input_scale"].item() and state["weight_scale"].shape == (1, 96)
    x = (torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    exact = _exact(x, parts)
    out = FP8ScaledMMKernel.apply(spec, {k: v.to(DEV) for k, v in state.items()}, x.to(DEV), None).cpu()
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


@triton_runs
def test_triton_rounds_the_input_as_the_scheme_does():
    from quantize.kernels.fp8_triton import fp8_codes

    s = torch.tensor([0.5], device=DEV)
    # carries into the next power of two, ties to even (normal and subnormal), saturation, zero, sign
    edge = torch.tensor([15.93, 17.0, 19.0, 2**-10, 3 * 2**-10, 2**-7 + 2**-11, 500.0, 0.0, -7.7, -1e30]) * 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.cat([edge, torch.randn(1000, generator=g) * 40, torch.randn(1000, generator=g) * 1e-3]).to(DEV).reshape(3, -1)
    q, rows = fp8_codes(x, s)
    assert torch.equal(q.float(), numerics_fp8.codes(x, s).float())  # (the interpreter drops the sign of -0)
    assert torch.equal(rows, s.expand(3, 1))


@triton_runs
@pytest.mark.parametrize("m", [1, 7, 33, 100])
def test_one_rounding_pass_then_scaled_mm_is_exact_arithmetic_rounded_once(m):
    parts = [{k: v.to(DEV) for k, v in _layer(48, 304, seed=m).items()}]
    state = FP8ScaledMMKernel.prepare(FPLinearSpec(FP8_STATIC, 304, 48, torch.bfloat16), parts)
    x = (torch.randn(m, 304, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16).to(DEV)
    out = fp8_scaled_mm.fp8_static_mm(x, state["weight"], state["weight_scale"], state["input_scale"])
    cpu = [{k: v.cpu() for k, v in parts[0].items()}]
    exact, magnitude = _exact(x.cpu(), cpu), _exact(x.cpu().abs(), [{**cpu[0], "weight": cpu[0]["weight"].abs()}])
    assert out.shape == (m, 48) and out.dtype == torch.bfloat16
    # one bf16 rounding of the sums; the sums themselves are float32 on the CPU, and on Hopper the FP8
    # tensor cores keep fewer bits while accumulating (~14: DeepSeek-V3's report): a share of the terms'
    # magnitude, far below what a wrong code or scale would cost
    excess = ((out.cpu().double() - exact).abs() - exact.abs() * 2**-8).clamp(min=0) / magnitude
    print(f"M={m}: error beyond one bf16 rounding, relative to the terms' magnitude: {excess.max().item():.1e}")
    assert (excess <= 2**-12).all()

