"""How tuning computes on the CPU: bf16 autocast (float32 master weights) where the CPU has bf16 matrix
instructions, float32 elsewhere; both tune, and the run's header says which and why."""

import copy

import pytest
import torch
from torch import nn

from quantize.model import capture_block_inputs, cpu_bf16_fast, default_amp, describe_compute, find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import _run_block
from quantize.scheme import Scheme
from quantize.signround import tune_block

CPU = torch.device("cpu")


def test_default_follows_the_cpu_features():
    assert default_amp(CPU) == cpu_bf16_fast()
    features = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert cpu_bf16_fast() == features
    header = describe_compute(CPU, default_amp(CPU))
    assert header.startswith("bf16 autocast") if features else header.startswith("float32")
    assert "this CPU" in header
    assert describe_compute(CPU, not default_amp(CPU)).endswith("(--amp)" if not features else "(--no-amp)")


@pytest.fixture(scope="module")
def block_setup(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    blocks = find_blocks(model)
    ids = torch.randint(0, 8000, (8, 32), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, blocks, ids, CPU, torch.float32)
    block = copy.deepcopy(blocks.modules[0]).float()
    layers = {n: Scheme(2, 32, True) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return block, layers, x, kwargs


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16-autocast"])
def test_both_modes_tune_below_rtn(block_setup, amp):
    block, layers, x, kwargs = block_setup
    targets = _run_block(block, x, kwargs, 4, amp)
    cfg = TuneConfig(iters=20, nsamples=8, seqlen=32, batch_size=4, amp=amp)
    tuned_block = copy.deepcopy(block)
    tuned = tune_block(tuned_block, layers, x, targets, kwargs, cfg, torch.Generator().manual_seed(0))
    assert tuned.loss_after < tuned.loss_before
    # Master weights stay float32 under autocast; the block holds the exact dequantized weights.
    for name, qw in tuned.weights.items():
        weight = tuned_block.get_submodule(name).weight
        assert weight.dtype == torch.float32 and torch.equal(weight, qw.dequantize(torch.float32))



def test_cpu_compiles_only_runs_long_enough_to_pay():
    """Compiling costs ~18 s per block shape on the CPU: a run compiles when iters x blocks reaches
    CPU_COMPILE_MIN_STEPS; an explicit choice stands, and CUDA keeps its own (block size) rule."""
    from quantize.signround import CPU_COMPILE_MIN_STEPS, settle_compile

    def blocks(n):
        return [nn.Linear(2, 2) for _ in range(n)]

    light = TuneConfig(iters=50)
    assert settle_compile(light, CPU, blocks(30)).compile is True  # SmolLM2-135M: 1500 steps
    assert settle_compile(light, CPU, blocks(8)).compile is False  # the 8-block reference model: 400 steps
    assert settle_compile(TuneConfig(iters=CPU_COMPILE_MIN_STEPS), CPU, blocks(1)).compile is True
    assert settle_compile(TuneConfig(iters=0), CPU, blocks(100)).compile is False
    assert settle_compile(TuneConfig(iters=50, compile=False), CPU, blocks(30)).compile is False
    assert settle_compile(light, torch.device("cuda"), blocks(30)).compile is None


def test_routed_experts_compile_their_layers_not_the_block():
    """A MoE block's loop over the experts the router picked has data-dependent shapes: it is never compiled
    whole; where compiling is wanted, each layer's quantize-dequantize is (one graph per weight shape)."""
    from quantize.moe import UnfusedExperts
    from quantize.signround import compiles, compiles_layers, settle_compile

    moe = nn.Sequential(UnfusedExperts(2, 4, 8, nn.SiLU()))
    dense = nn.Sequential(nn.Linear(4, 8))
    cuda, many = torch.device("cuda"), 1 << 30
    assert compiles(TuneConfig(iters=200), cuda, dense, many) is True
    assert not compiles_layers(TuneConfig(iters=200), cuda, dense)
    assert compiles(TuneConfig(iters=200), cuda, moe, many) is False
    assert compiles(TuneConfig(iters=200, compile=True), cuda, moe, many) is False
    assert compiles_layers(TuneConfig(iters=200), cuda, moe) and compiles_layers(TuneConfig(iters=200, compile=True), CPU, moe)
    assert not compiles_layers(TuneConfig(iters=200, compile=False), cuda, moe)
    assert not compiles_layers(TuneConfig(iters=0), cuda, moe)
    assert settle_compile(TuneConfig(iters=50), CPU, [moe] * 30).compile is True  # 1500 steps: the layers compile
    assert settle_compile(TuneConfig(iters=2), CPU, [moe] * 2).compile is False
