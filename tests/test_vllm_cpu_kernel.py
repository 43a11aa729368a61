"""vLLM's CPU int4 GEMM as a quantize.kernels entry: picked only for the activation dtypes it implements,
equal to the portable path within bf16/fp16 rounding, and correct when handed float32 anyway.

The op exists in vLLM's AVX-512 CPU builds only; on an AVX2-only machine the dispatch must say so and
keep every layer on the portable path (tested there), and the numeric tests skip."""

import pytest
import torch

pytest.importorskip("vllm")

import vllm._custom_ops  # noqa: E402,F401  (a vLLM process has it loaded: the kernel is offered only then)
from vllm.platforms import current_platform  # noqa: E402

from quantize.kernels import KERNELS, LinearSpec, select_kernel  # noqa: E402

from conftest import random_4bit_layer  # noqa: E402

CPU = torch.device("cpu")
current_platform.import_kernels()  # loads vllm._C (and its ops) as a vLLM process would
HAS_OP = hasattr(torch.ops._C, "cpu_gemm_wna16")
needs_op = pytest.mark.skipif(not HAS_OP, reason="this CPU's vLLM build has no cpu_gemm_wna16 (AVX-512 builds only)")


def _layer(sym: bool, layout: str, dtype: torch.dtype, group_size: int = 32, n: int = 96, k: int = 256):
    spec, packed, _ = random_4bit_layer(group_size, sym, layout, n, k)
    spec = LinearSpec(spec.bits, spec.group_size, spec.sym, spec.layout, k, n, dtype)
    ckpt = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    return spec, ckpt


def _run(name: str, spec, ckpt, x, bias=None):
    kernel = KERNELS[name]
    return kernel.apply(spec, {**ckpt, **kernel.prepare(spec, *ckpt.values())}, x, bias)


def test_float32_layers_do_not_take_the_op():
    from quantize.kernels.cpu_lowbit import toolchain_missing

    spec, _ = _layer(True, "gptq", torch.float32)
    # our compiled CPU kernel for float32 models (kernels/cpu_lowbit.py) where it can build, else the portable path
    assert select_kernel(spec, CPU).name == ("torch" if toolchain_missing() else "cpu_lowbit")
    assert "bfloat16/float16" in KERNELS["vllm_cpu"].unsupported(spec, CPU) or not HAS_OP
    unknown = LinearSpec(4, 32, True, "gptq", 256, 96)  # dtype not known: not picked either
    assert select_kernel(unknown, CPU).name == "torch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_layers_pick_the_op_where_it_exists(dtype):
    spec, _ = _layer(True, "gptq", dtype)
    # Without the op, bf16 layers take torch's own CPU int4 GEMM (kernels/tinygemm_cpu.py).
    assert select_kernel(spec, CPU).name == ("vllm_cpu" if HAS_OP else "tinygemm_cpu" if dtype == torch.bfloat16 else "torch")
    if not HAS_OP:
        assert "cpu_gemm_wna16" in KERNELS["vllm_cpu"].unsupported(spec, CPU)


@needs_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym, layout", [(True, "gptq"), (False, "awq"), (False, "auto_round")])
def test_op_equals_the_portable_path(dtype, sym, layout):
    spec, ckpt = _layer(sym, layout, dtype)
    torch.manual_seed(1)
    x = torch.randn(5, spec.in_features)
    bias = torch.randn(spec.out_features)
    want = _run("torch", spec, ckpt, x, bias)  # float32 reference: exact dequantized weights
    got = _run("vllm_cpu", spec, ckpt, x.to(dtype), bias)
    assert got.dtype == dtype
    # The op accumulates in float32 from 16-bit inputs: the error is the inputs' rounding (bf16: 2^-8).
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    assert ((got.float() - want).norm() / want.norm()).item() < tol


@needs_op
def test_float32_activations_on_a_16bit_layer_compute_correctly():
    """A model cast to float32 after loading keeps its vllm_cpu layers: they compute on the portable path."""
    spec, ckpt = _layer(False, "awq", torch.bfloat16)
    x = torch.randn(3, spec.in_features)
    assert torch.equal(_run("vllm_cpu", spec, ckpt, x), _run("torch", spec, ckpt, x))


@needs_op
def test_op_is_a_fresh_process_first_amx_instruction():
    """On an AMX CPU the op runs AMX tiles, which Linux grants a process only on request: a process whose
    first AMX instruction is this op died of SIGILL until the kernel asked for them itself."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch, vllm._custom_ops
from vllm.platforms import current_platform
current_platform.import_kernels()
from conftest import random_4bit_layer
from quantize.kernels import KERNELS, LinearSpec
spec, packed, _ = random_4bit_layer(32, True, "gptq", 96, 256)
spec = LinearSpec(4, 32, True, "gptq", 256, 96, torch.bfloat16)
ckpt = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
kernel = KERNELS["vllm_cpu"]
out = kernel.apply(spec, {**ckpt, **kernel.prepare(spec, *ckpt.values())}, torch.randn(3, 256, dtype=torch.bfloat16), None)
print("finite", bool(out.isfinite().all()))
"""
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "finite True" in run.stdout, (run.returncode, run.stderr[-2000:])
