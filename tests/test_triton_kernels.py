"""Triton kernels against the reference dequantize + matmul: on a GPU, or in Triton's interpreter on the
CPU (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""

import os

import pytest
import torch

from quantize.numerics import dequantize, quantize_weight
from quantize.packing import pack

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from quantize.kernels.dispatch import LinearSpec  # noqa: E402
from quantize.kernels.triton_gemm import TritonKernel, gptq_form, wq_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1},  # GEMV tiles may span groups
    {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 2},
]
GEMM_4BIT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1}


def case(bits, group_size, sym, layout, n, k, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.02
    q, scales, zeros = quantize_weight(w, bits, group_size, sym)
    packed = pack(layout, q, scales, zeros, bits)
    spec = LinearSpec(bits, group_size, sym, layout, k, n)
    return spec, packed, dequantize(q, scales, zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym, layout", [(True, "gptq"), (False, "auto_round")])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("config", CONFIGS, ids=["gemm", "gemm_split_k", "gemv", "gemv_split_k"])
def test_matches_reference(bits, sym, layout, group_size, config):
    n, k, m = 96, 320, 3  # N, M and K not multiples of the tiles (K a multiple of 32, as packing needs)
    if 32 % bits:
        config = {**config, "BLOCK_K": 32}  # 3-bit tiles read one row of scales: they must divide the group
    spec, packed, w = case(bits, group_size, sym, layout, n, k, seed=bits)
    qweight, zeros = gptq_form(spec, packed.qweight, packed.qzeros, packed.scales)
    x = torch.randn(m, k)
    got = wq_matmul(x.to(DEVICE), qweight.to(DEVICE), packed.scales.to(DEVICE), zeros.to(DEVICE), bits, group_size, config)
    ref = x @ w.t()
    err = (got.cpu().float() - ref).norm() / ref.norm()
    assert err < 3e-3, err  # float32 in the interpreter; tf32 dots on a GPU


def test_awq_layout_is_repacked():
    spec, packed, w = case(4, 32, False, "awq", 64, 64)
    qweight, zeros = gptq_form(spec, packed.qweight, packed.qzeros, packed.scales)
    x = torch.randn(2, 64)
    got = wq_matmul(x.to(DEVICE), qweight.to(DEVICE), packed.scales.to(DEVICE), zeros.to(DEVICE), 4, 32, GEMM_4BIT)
    assert ((got.cpu() - x @ w.t()).norm() / (x @ w.t()).norm()) < 3e-3


def test_kernel_class_applies_bias_and_batch_dims():
    spec, packed, w = case(4, 32, True, "gptq", 32, 64)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(TritonKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    x = torch.randn(2, 3, 64)
    bias = torch.randn(32)
    state = {k: v.to(DEVICE) for k, v in state.items()}
    # the autotuner would time configs; in the interpreter, call with one fixed config through wq_matmul
    y = wq_matmul(x.reshape(-1, 64).to(DEVICE), state["qweight"], state["scales"], state["zeros"], 4, 32, GEMM_4BIT).reshape(2, 3, 32) + bias.to(DEVICE)
    ref = x @ w.t() + bias
    assert ((y.cpu() - ref).norm() / ref.norm()) < 3e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner times real kernels: GPU only")
@pytest.mark.parametrize("m", [1, 16, 200])
def test_autotuned_path_every_bits_on_one_shape(m):
    # One shape for every bit width in a row: a config tuned for one width must never serve another.
    for bits in (4, 3, 2, 8):
        spec, packed, w = case(bits, 128, True, "gptq", 512, 1024, seed=bits)
        qweight, zeros = gptq_form(spec, packed.qweight, packed.qzeros, packed.scales)
        x = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
        got = wq_matmul(x, qweight.cuda(), packed.scales.cuda(), zeros.cuda(), bits, 128)
        ref = x.float() @ w.cuda().t()
        assert ((got.float() - ref).norm() / ref.norm()) < 1e-2, bits
