"""torch's CPU int4 GEMM as the CPU kernel for 2/3/4-bit layers of bfloat16 models: equal to the portable
path within bf16 rounding for every layout, bit width and group size it takes, decode-sized calls on the
op and longer ones on the portable path, and picked only where it applies."""

from __future__ import annotations

import pytest
import torch

from quantize.kernels import KERNELS, LinearSpec, select_kernel
from quantize.kernels.tinygemm_cpu import MAX_M
from quantize.numerics import quantize_weight
from quantize.packing import pack

if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
    pytest.skip("this torch has no CPU int4pack op", allow_module_level=True)

CPU = torch.device("cpu")


def _layer(bits, group, sym, layout, n=96, k=256, dtype=torch.bfloat16, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s, z = quantize_weight(w, bits, group, sym)
    p = pack(layout, q, s, z, bits)
    spec = LinearSpec(bits, group, sym, layout, k, n, dtype)
    return spec, {"qweight": p.qweight, "qzeros": p.qzeros, "scales": p.scales}


def _run(name, spec, ckpt, x, bias=None):
    kernel = KERNELS[name]
    return kernel.apply(spec, {**ckpt, **kernel.prepare(spec, *ckpt.values())}, x, bias)


CASES = [(4, 128, True, "gptq"), (4, 32, False, "awq"), (3, 64, False, "auto_round"), (3, 128, True, "gptq"),
         (2, 32, True, "gptq"), (2, 64, False, "auto_round")]


@pytest.mark.parametrize("bits, group, sym, layout", CASES)
@pytest.mark.parametrize("m", [1, MAX_M, MAX_M + 3])
def test_equals_the_portable_path(bits, group, sym, layout, m):
    spec, ckpt = _layer(bits, group, sym, layout)
    x = torch.randn(m, spec.in_features, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(spec.out_features)
    want = _run("torch", spec, ckpt, x, bias)  # float32: the exact dequantized weights
    got = _run("tinygemm_cpu", spec, ckpt, x.to(torch.bfloat16), bias)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # bf16 inputs, scales and zero offsets (unit roundoff 2^-8), float32 accumulation: as close as the
    # portable path computing in bf16 (~3e-3 here); without the centring of narrow codes, 2-bit layers were 2% off.
    assert ((got.float() - want).norm() / want.norm()).item() < 5e-3


def test_batched_input_keeps_its_shape():
    spec, ckpt = _layer(4, 32, True, "gptq")
    x = torch.randn(2, 1, spec.in_features, dtype=torch.bfloat16)
    assert _run("tinygemm_cpu", spec, ckpt, x).shape == (2, 1, spec.out_features)


def test_picked_where_it_applies():
    bf16 = dict(dtype=torch.bfloat16)
    assert select_kernel(_layer(3, 128, False, "auto_round", **bf16)[0], CPU).name == "tinygemm_cpu"
    assert select_kernel(_layer(2, 32, True, "gptq", **bf16)[0], CPU).name == "tinygemm_cpu"
    why = KERNELS["tinygemm_cpu"].unsupported
    assert "bfloat16" in why(_layer(4, 128, True, "gptq", dtype=torch.float32)[0], CPU)
    assert "8-bit" in why(_layer(8, 128, True, "gptq")[0], CPU)
    assert "group size -1" in why(_layer(4, -1, True, "gptq")[0], CPU)
    assert "multiple of 16" in why(_layer(4, 32, True, "gptq", n=104)[0], CPU)
    assert why(_layer(4, 32, True, "gptq")[0], torch.device("cuda")) == "CPU only"
