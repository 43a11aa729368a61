"""The tinygemm kernel (torch's int4 weight-only GEMM): conversion of our scales/zeros, packing, and
equality with the reference. The CPU variant of torch's op (same formula, its own packing) runs the
kernel class here; tests/test_cuda.py runs the CUDA op on the GPU machine.

Stated tolerance (see kernels/tinygemm.py): per weight ``|w_tg - w| <= 3 * 2**-8 * |s| * (|q-8| + |8-z|)``;
products within 1e-2 relative (Frobenius) of the float32 reference ``x.float() @ w.T``."""

import pytest
import torch

from quantize.kernels import tinygemm
from quantize.kernels.dispatch import LinearSpec
from quantize.kernels.tinygemm import (
    U,
    TinygemmKernel,
    int4_mm,
    nibbles,
    pack_weight,
    scales_and_zeros,
    unnibble,
)
from quantize.numerics import dequantize

from conftest import random_4bit_layer

if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
    pytest.skip("this torch has no CPU int4pack op", allow_module_level=True)

REL_TOL = 1e-2


def test_nibbles_round_trip_even_k_high():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    b = nibbles(q)
    assert b.shape == (8, 32) and b.dtype == torch.uint8
    assert torch.equal(b >> 4, q[:, 0::2]) and torch.equal(b & 15, q[:, 1::2])
    assert torch.equal(unnibble(b), q)


@pytest.mark.parametrize("sym", [True, False])
def test_scales_and_zeros_exact_then_rounded_once(sym):
    _, _, (q, s, z) = random_4bit_layer(32, sym, "auto_round", 16, 128)
    sz = scales_and_zeros(s, z)
    assert sz.shape == (4, 16, 2) and sz.dtype == torch.bfloat16
    exact = s.double() * (8 - z.double())
    assert torch.equal(sz[..., 0], s.t().to(torch.bfloat16))
    assert torch.equal(sz[..., 1], exact.t().to(torch.bfloat16))
    if sym:
        assert torch.all(sz[..., 1] == 0)


@pytest.mark.parametrize("sym, group_size", [(True, 128), (False, 32), (False, 64), (False, 256)])
def test_per_weight_bound(sym, group_size):
    # The op applied to the identity gives its dequantized weights (one product per output, exact in
    # float32, then one bf16 rounding of the output: within the bound's margin).
    n, k = 32, 256  # (the CPU op wants N a multiple of 16; the CUDA op 8)
    _, _, (q, s, z) = random_4bit_layer(group_size, sym, "auto_round", n, k, seed=1)
    packed = pack_weight(q, tinygemm.inner_k_tiles(k))
    w_tg = int4_mm(torch.eye(k, dtype=torch.bfloat16), packed, group_size, scales_and_zeros(s, z)).float().t()
    w = dequantize(q, s, z).double()
    g = k // group_size
    sg = s.double().repeat_interleave(group_size, 1)
    zg = z.double().repeat_interleave(group_size, 1)
    bound = 3 * U * sg.abs() * ((q.double() - 8).abs() + (8 - zg).abs())
    assert g == s.shape[1]
    assert torch.all((w_tg.double() - w).abs() <= bound + 1e-12)


@pytest.mark.parametrize("sym, layout", [(True, "gptq"), (False, "auto_round"), (False, "awq")])
@pytest.mark.parametrize("group_size, n, k", [
    (g, n, k) for g in (32, 64, 128) for n, k in ((48, 128), (16, 96)) if k % g == 0  # K 96: inner k-tiles 2
])
def test_kernel_class_matches_reference(sym, layout, group_size, n, k):
    spec, packed, (q, s, z) = random_4bit_layer(group_size, sym, layout, n, k)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(TinygemmKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    w = dequantize(q, s, z)
    for m in (1, 5, tinygemm.MAX_M):  # (above MAX_M: Triton, whose interpreter gets bf16 dots wrong)
        x = torch.randn(m, k).to(torch.bfloat16)
        y = TinygemmKernel.apply(spec, state, x, None)
        ref = x.float() @ w.t()
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert ((y.float() - ref).norm() / ref.norm()) < REL_TOL, m


def test_bias_batch_dims_and_fallback_routing(monkeypatch):
    spec, packed, (q, s, z) = random_4bit_layer(64, False, "auto_round", 32, 128)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(TinygemmKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    w = dequantize(q, s, z)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    bias = torch.randn(32).to(torch.bfloat16)
    y = TinygemmKernel.apply(spec, state, x, bias)
    ref = x.float() @ w.t() + bias.float()
    assert y.shape == (2, 3, 32) and ((y.float() - ref).norm() / ref.norm()) < REL_TOL

    calls = []

    class Stub:
        @staticmethod
        def apply(spec, state, x, bias):
            calls.append((x.dtype, x.shape))
            return x

    def wq_matmul(x, qweight, scales, zeros, bits, group_size):  # Triton's entry for bf16 calls above MAX_M
        calls.append((x.dtype, x.shape))
        return x.new_zeros(x.shape[0], spec.out_features)

    triton_gemm = pytest.importorskip("quantize.kernels.triton_gemm")
    monkeypatch.setattr(tinygemm, "_fallback", lambda: Stub)
    monkeypatch.setattr(triton_gemm, "wq_matmul", wq_matmul)
    TinygemmKernel.apply(spec, state, torch.randn(4, 128), None)  # float32: not for tinygemm
    TinygemmKernel.apply(spec, state, torch.randn(4, 128, dtype=torch.float16), None)
    TinygemmKernel.apply(spec, state, torch.randn(tinygemm.MAX_M + 1, 128, dtype=torch.bfloat16), None)
    TinygemmKernel.apply(spec, state, torch.randn(tinygemm.MAX_M, 128, dtype=torch.bfloat16), None)  # tinygemm
    assert [c[0] for c in calls] == [torch.float32, torch.float16, torch.bfloat16]


def test_unsupported_reasons():
    cuda = torch.device("cuda")
    assert TinygemmKernel.unsupported(LinearSpec(4, 128, True, "gptq", 256, 64), torch.device("cpu"))
    if tinygemm.op_unavailable(cuda) is None:
        assert TinygemmKernel.unsupported(LinearSpec(4, 128, True, "gptq", 4096, 4096), cuda) is None
    for spec in (LinearSpec(3, 128, True, "gptq", 256, 64), LinearSpec(4, 48, True, "gptq", 96, 64),
                 LinearSpec(4, -1, True, "gptq", 256, 64), LinearSpec(4, 32, True, "gptq", 256, 60),
                 LinearSpec(8, 128, False, "auto_round", 256, 64)):
        assert TinygemmKernel.unsupported(spec, cuda), spec


def test_compiled_layer_chooses_by_m_at_run_time(monkeypatch):
    # Traced once with a symbolic M (as vLLM compiles), then run at M on both sides of MAX_M without
    # recompiling: the choice happens inside the quantize::int4_mm_by_m op. The large-M side is Triton's
    # wq_matmul, replaced here by a recorder (Triton's CPU interpreter has no bf16; test_cuda runs it).
    triton_gemm = pytest.importorskip("quantize.kernels.triton_gemm")
    spec, packed, (q, s, z) = random_4bit_layer(64, True, "gptq", 64, 128)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(TinygemmKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    w = dequantize(q, s, z)
    large = []

    def recorder(x, qweight, scales, zeros, bits, group_size):
        large.append(x.shape[0])
        return (x.float() @ w.t()).to(x.dtype)

    monkeypatch.setattr(triton_gemm, "wq_matmul", recorder)
    fn = torch.compile(lambda x: TinygemmKernel.apply(spec, state, x, None), backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    sizes = (3, tinygemm.MAX_M + 5, 2, tinygemm.MAX_M)
    for i, m in enumerate(sizes):
        x = torch.randn(m, 128).to(torch.bfloat16)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            y = fn(x)
        ref = x.float() @ w.t()
        assert y.shape == (m, 64) and ((y.float() - ref).norm() / ref.norm()) < REL_TOL, m
    assert large == [tinygemm.MAX_M + 5]
