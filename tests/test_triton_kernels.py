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

from quantize.kernels.dispatch import LinearSpec
from quantize.kernels.triton_gemm import (
    TritonKernel,
    _counters,
    kernel_form,
    pack_slices,
    pick_config,
    unpack_slices,
    wq_matmul,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 1, "SWAP": False},
    {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 2, "SWAP": True},  # split-K tickets, small M in the MMA's N
    {"BLOCK_N": 64, "SPLIT_K": 1},
    {"BLOCK_N": 32, "SPLIT_K": 2},
    {"DEQUANT": True, "BLOCK_N": 64},
]
GEMM_4BIT = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 1, "SWAP": False}


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
@pytest.mark.parametrize("config", CONFIGS, ids=["gemm", "gemm_swap_split_k", "gemv", "gemv_split_k", "dequant"])
def test_matches_reference(bits, sym, layout, group_size, config):
    n, k, m = 96, 320, 3  # N, M and K not multiples of the tiles or chunks (K a multiple of 32, as packing needs)
    spec, packed, w = case(bits, group_size, sym, layout, n, k, seed=bits)
    qweight, zeros = kernel_form(spec, packed.qweight, packed.qzeros, packed.scales)
    x = torch.randn(m, k)
    got = wq_matmul(x.to(DEVICE), qweight.to(DEVICE), packed.scales.to(DEVICE), zeros.to(DEVICE), bits, group_size, config)
    ref = x @ w.t()
    err = (got.cpu().float() - ref).norm() / ref.norm()
    assert err < 3e-3, err  # float32 in the interpreter; tf32 dots on a GPU


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_slice_layout_round_trip(bits):
    q = torch.randint(0, 2**bits, (40, 608), dtype=torch.uint8)
    words = pack_slices(q, bits)
    assert words.dtype == torch.int32 and words.shape[0] * 32 % bits == 0
    assert torch.equal(unpack_slices(words, bits, 608), q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("group_size", [64, 128])
def test_activation_dtypes_and_groups(dtype, group_size):
    spec, packed, w = case(4, group_size, False, "auto_round", 80, 384, seed=group_size)
    qweight, zeros = kernel_form(spec, packed.qweight, packed.qzeros, packed.scales)
    x = torch.randn(5, 384)
    ref = x @ w.t()
    for config in (GEMM_4BIT, {"BLOCK_N": 32, "SPLIT_K": 2}):
        got = wq_matmul(x.to(dtype).to(DEVICE), qweight.to(DEVICE), packed.scales.to(DEVICE), zeros.to(DEVICE), 4, group_size, config)
        assert got.dtype == dtype
        assert ((got.cpu().float() - ref).norm() / ref.norm()) < 3e-3


def test_split_k_tickets_are_left_at_zero():
    # The last split of every tile resets its ticket, so calls with another split count stay correct.
    spec, packed, w = case(4, 32, True, "gptq", 96, 640)
    qweight, zeros = kernel_form(spec, packed.qweight, packed.qzeros, packed.scales)
    x = torch.randn(2, 640)
    ref = x @ w.t()
    for split in (2, 3, 2):
        for config in ({"BLOCK_N": 32, "SPLIT_K": split}, {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": split, "SWAP": True}):
            got = wq_matmul(x.to(DEVICE), qweight.to(DEVICE), packed.scales.to(DEVICE), zeros.to(DEVICE), 4, 32, config)
            assert ((got.cpu() - ref).norm() / ref.norm()) < 3e-3, (split, config)
    assert int(_counters(torch.device(DEVICE)).abs().sum()) == 0


def test_picked_configs_are_valid():
    for m in (1, 2, 16, 17, 64, 256, 1024, 4096):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (96, 320)):
            for bits in (2, 3, 4, 8):
                cfg = pick_config(m, n, k, bits)
                assert "DEQUANT" in cfg or 1 <= cfg["SPLIT_K"] <= 16


def test_awq_layout_is_repacked():
    spec, packed, w = case(4, 32, False, "awq", 64, 64)
    qweight, zeros = kernel_form(spec, packed.qweight, packed.qzeros, packed.scales)
    x = torch.randn(2, 64)
    got = wq_matmul(x.to(DEVICE), qweight.to(DEVICE), packed.scales.to(DEVICE), zeros.to(DEVICE), 4, 32, GEMM_4BIT)
    assert ((got.cpu() - x @ w.t()).norm() / (x @ w.t()).norm()) < 3e-3


def test_kernel_class_applies_bias_and_batch_dims():
    spec, packed, w = case(4, 32, True, "gptq", 32, 64)
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(TritonKernel.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    assert TritonKernel.unsupported(LinearSpec(4, 48, True, "gptq", 96, 32), torch.device("cuda"))
    x = torch.randn(2, 3, 64)
    bias = torch.randn(32)
    state = {k: v.to(DEVICE) for k, v in state.items()}
    y = wq_matmul(x.reshape(-1, 64).to(DEVICE), state["qweight"], state["scales"], state["zeros"], 4, 32, GEMM_4BIT).reshape(2, 3, 32) + bias.to(DEVICE)
    ref = x @ w.t() + bias
    assert ((y.cpu() - ref).norm() / ref.norm()) < 3e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 activations and the picked configs: GPU only")
@pytest.mark.parametrize("m", [1, 2, 16, 64, 200, 1024])
def test_default_path_every_bits_on_one_shape(m):
    # The picked config (no explicit one) for every bit width, bf16 activations.
    for bits in (4, 3, 2, 8):
        spec, packed, w = case(bits, 128, True, "gptq", 512, 1024, seed=bits)
        qweight, zeros = kernel_form(spec, packed.qweight, packed.qzeros, packed.scales)
        x = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
        got = wq_matmul(x, qweight.cuda(), packed.scales.cuda(), zeros.cuda(), bits, 128)
        ref = x.float() @ w.cuda().t()
        assert ((got.float() - ref).norm() / ref.norm()) < 1e-2, bits
