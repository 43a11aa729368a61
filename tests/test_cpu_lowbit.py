"""The compiled CPU kernel for float32 models (quantize.kernels.cpu_lowbit) against the portable path, and
its place in the dispatch. The first test in a process builds it (about a minute; torch caches the build)."""

from __future__ import annotations

import pytest
import torch

from quantize.kernels import KERNELS, LinearSpec, cpu_lowbit, select_kernel
from quantize.scheme import Scheme

from conftest import random_packed_layer, reference_linear

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def built():
    module = cpu_lowbit._module()
    if isinstance(module, str):
        pytest.skip(module)


@pytest.mark.parametrize("bits, group, sym, layout, n, k", [
    (4, 128, True, "gptq", 72, 256),
    (4, 32, False, "awq", 64, 96),
    (3, 64, False, "auto_round", 64, 192),
    (2, 64, True, "gptq", 48, 128),
    (8, -1, True, "gptq", 36, 100),  # one group per row, K not a multiple of 8 (the scalar tail)
    (8, 32, False, "auto_round", 32, 64),
])
@pytest.mark.parametrize("m", [1, 3, cpu_lowbit.MAX_M, cpu_lowbit.MAX_M + 1])  # the last: the dequantize-once path
def test_equals_the_portable_path(bits, group, sym, layout, n, k, m):
    scheme = Scheme(bits, group, sym)
    packed = random_packed_layer(scheme, layout, n, k, seed=bits * 100 + m)
    spec = LinearSpec(bits, group, sym, layout, k, n, torch.float32)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(cpu_lowbit.CpuLowbitKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    x = torch.randn(2, m, k)
    bias = torch.randn(n)
    out = cpu_lowbit.CpuLowbitKernel.apply(spec, state, x, bias)
    ref = reference_linear(scheme, layout, packed, n, k, x) + bias
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    # float32 sums in another order: the scale factored out of each group's sum
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_dispatch_takes_it_for_float32_models_only():
    spec = LinearSpec(4, 128, True, "gptq", 256, 64, torch.float32)
    assert select_kernel(spec, CPU).name == "cpu_lowbit"
    assert select_kernel(LinearSpec(4, 128, True, "gptq", 256, 64, torch.bfloat16), CPU).name != "cpu_lowbit"
    assert "float32" in KERNELS["cpu_lowbit"].unsupported(LinearSpec(4, 128, True, "gptq", 256, 64, torch.float16), CPU)


def test_without_a_toolchain_or_a_build_the_portable_path_computes(monkeypatch):
    spec = LinearSpec(4, 128, True, "gptq", 256, 64, torch.float32)
    monkeypatch.setattr(cpu_lowbit, "toolchain_missing", lambda: "needs ninja to build its C++ extension (pip install ninja)")
    assert "pip install ninja" in KERNELS["cpu_lowbit"].unsupported(spec, CPU)
    assert select_kernel(spec, CPU).name == "torch"
    # a toolchain that fails to build: the calls fall back, same results
    packed = random_packed_layer(Scheme(4, 128, True), "gptq", 64, 256, seed=1)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(cpu_lowbit.CpuLowbitKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    monkeypatch.setattr(cpu_lowbit, "_module", lambda: "could not build its C++ extension: error")
    x = torch.randn(1, 256)
    torch.testing.assert_close(cpu_lowbit.CpuLowbitKernel.apply(spec, state, x, None),
                               reference_linear(Scheme(4, 128, True), "gptq", packed, 64, 256, x))


def test_the_op_on_any_shape():
    # N not a multiple of the four channels computed together (no packed layout makes one), a scalar tail
    n, k, group = 70, 100, 50
    q = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // group) + 0.1, torch.randint(0, 256, (n, k // group)).float()
    x = torch.randn(3, k)
    out = cpu_lowbit._module().lowbit_mm(x, q, scales, scales * zeros, group)
    w = (q.float().reshape(n, -1, group) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
    torch.testing.assert_close(out, x @ w.reshape(n, k).t(), rtol=1e-5, atol=1e-3)
