"""SignRound on a real block of a pretrained model (the reference model, or SmolLM2-135M without the
shared data): tuning must beat round-to-nearest."""

import contextlib
import copy

import pytest

import torch

from quantize.calib import calibration_ids
from quantize.model import capture_block_inputs, find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import _run_block
from quantize.scheme import Scheme
from quantize.signround import sample_batches, tune_block

from conftest import CALIB


@pytest.fixture(scope="module")
def first_block(pretrained):
    """Block 1 of the model with its calibration inputs and targets, built once (loading SmolLM2 takes ~15 s)."""
    model, tok = load_model(pretrained)
    blocks = find_blocks(model)
    ids = calibration_ids(str(CALIB), tok, nsamples=16, seqlen=128, seed=0)
    x, kwargs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), torch.float32)
    block = copy.deepcopy(blocks.modules[1]).float()  # block 1: its inputs went through block 0
    x = _run_block(blocks.modules[0].float(), x, kwargs, 8, False)
    targets = _run_block(block, x, kwargs, 8, False)
    layers = {n: Scheme(2, 64, True) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return block, layers, x, targets, kwargs


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-grads", "fp8-grads"])
def test_signround_beats_rtn(first_block, fp8):
    block, layers, x, targets, kwargs = first_block
    rtn = tune_block(copy.deepcopy(block), layers, x, targets, kwargs, TuneConfig(iters=0, nsamples=16, batch_size=4), torch.Generator().manual_seed(0))
    tuned_block = copy.deepcopy(block)
    cfg = TuneConfig(iters=40, nsamples=16, batch_size=4, fp8_grads=fp8)
    tuned = tune_block(tuned_block, layers, x, targets, kwargs, cfg, torch.Generator().manual_seed(0))
    # The float8 stand-ins are gone again once tuning is over.
    assert all(type(m) is torch.nn.Linear for n, m in tuned_block.named_modules() if n in layers)
    assert rtn.loss_before == rtn.loss_after  # iters=0 is exactly RTN
    assert tuned.loss_before == rtn.loss_after
    assert tuned.loss_after < 0.9 * rtn.loss_after, (rtn.loss_after, tuned.loss_after)
    # The block now computes with exactly the dequantized integer weights it reports.
    for name, qw in tuned.weights.items():
        assert torch.equal(tuned_block.get_submodule(name).weight, qw.dequantize(torch.float32))
        assert qw.q.max() <= 3 and qw.scales.dtype == torch.float16


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-grads", "fp8-grads"])
def test_compiled_tuning_step_equals_eager_and_compiles_once(tiny_llama, fp8):
    """The whole-block compiled loss (quantize-dequantize + forward + backward) gives eager mode's loss
    and gradients, and a second block of the same shape reuses the first one's compiled graph; also with
    the float8 backward products in place."""
    from quantize.fp8_grads import fp8_grad_linears
    from quantize.signround import tuning_loss

    model, _ = load_model(str(tiny_llama))
    blocks = find_blocks(model)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(1)
    eager, compiled = tuning_loss(False), tuning_loss(True)
    for i, block in enumerate(blocks.modules):
        block = block.float().requires_grad_(False)
        weights = {n: m.weight for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        schemes = {n: (Scheme(4, 32, True), {}) for n in weights}  # (scheme, its rule's fixed context)
        y = _run_block(block, x, kwargs, 4, False) + 0.01 * torch.randn(x.shape, generator=gen)

        def params():
            torch.manual_seed(i)
            return {n: tuple(t.requires_grad_() for t in (
                0.3 * torch.rand(w.shape) - 0.15, 0.9 + 0.1 * torch.rand(w.shape[0], w.shape[1] // 32),
                0.9 + 0.1 * torch.rand(w.shape[0], w.shape[1] // 32))) for n, w in weights.items()}

        results = []
        for fn in (eager, compiled):
            p = params()
            with fp8_grad_linears(block, weights) if fp8 else contextlib.nullcontext():
                with torch.compiler.set_stance("fail_on_recompile" if i and fn is compiled else "default"):
                    loss = fn(block, weights, p, schemes, {}, x, y, kwargs, False)
                loss.backward()
            results.append((loss.detach(), [t.grad for ts in p.values() for t in ts]))
        (eager_loss, eager_grads), (comp_loss, comp_grads) = results
        torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=0)
        for g_c, g_e in zip(comp_grads, eager_grads):
            if fp8:  # a float8 cast may round the other way after a fused division: the signs must hold
                assert (g_c - g_e).norm() <= 0.1 * g_e.norm()
                nonzero = g_e != 0
                assert (torch.sign(g_c) == torch.sign(g_e))[nonzero].float().mean() > 0.95
            else:
                torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-7)


# compiled: the search's compiled error pass (CPU tuning runs that compile), for the int rule it serves most
@pytest.mark.parametrize("name, compiled", [("W2A16G32", False), ("W2A16G32", True), ("NVFP4A16", False), ("MXFP4A16", False)])
def test_clip_search_picks_the_grid_factor_with_least_weighted_error(name, compiled):
    from quantize import weight_rules
    from quantize.scheme import get_scheme
    from quantize.signround import search_clip

    torch.manual_seed(0)
    scheme = get_scheme(name)
    w = torch.randn(6, 64)
    w[:, 5] = 4.0  # an outlier in every row's first group
    importance = torch.rand(64) + 0.1
    clip = search_clip(w, scheme, importance, compiled=compiled)
    g = 64 // scheme.group_size
    grid = weight_rules.search_grid(scheme)
    assert clip.shape == (6, g) and set(clip.unique().tolist()) <= set(torch.tensor(grid).tolist())

    def error(factor: torch.Tensor) -> torch.Tensor:
        diff = (w - weight_rules.fake_quantize(w, scheme, 0.0, factor, factor)).reshape(6, g, -1)
        return (importance.reshape(1, g, -1) * diff.square()).sum(-1)

    brute = torch.stack([error(torch.full((6, g), r)) for r in grid]).min(0).values
    torch.testing.assert_close(error(clip), brute)
    assert (error(clip) <= error(torch.ones(6, g))).all() and (error(clip) < error(torch.ones(6, g))).any()


def test_clip_initialisation_tunes_from_the_searched_factors(first_block):
    block, layers, x, targets, kwargs = first_block
    cfg = TuneConfig(iters=10, nsamples=16, batch_size=4, init_clip=True)
    tuned = tune_block(copy.deepcopy(block), layers, x, targets, kwargs, cfg, torch.Generator().manual_seed(0))
    assert tuned.loss_after < tuned.loss_before


@pytest.mark.parametrize("scheme", ["W4A16G32", "MXFP4A16", "NVFP4A16", "NVFP4"])
def test_optimized_rtn_searches_each_groups_clipping(tiny_llama, scheme):
    """iters 0 with init_clip (AutoRound's optimized RTN): round_block searches each group's clipping factor
    on the calibration inputs' energy, with tune_block's iters-0 codes, and every layer's activation-weighted
    rounding error is at most plain RTN's (below it in some group)."""
    from quantize.model import uses_amp
    from quantize.scheme import get_scheme
    from quantize.signround import _input_energy, round_block, searched_layers

    model, _ = load_model(str(tiny_llama))
    block = find_blocks(model).modules[0].float()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, find_blocks(model), ids, torch.device("cpu"), torch.float32)
    layers = {n: get_scheme(scheme) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = TuneConfig(iters=0, nsamples=4, batch_size=2, init_clip=True)
    assert searched_layers(cfg, layers) == list(layers) and searched_layers(TuneConfig(iters=0), layers) == []
    amp = uses_amp(None, torch.device("cpu"))
    energy = _input_energy(copy.deepcopy(block), list(layers), x, kwargs, 2, amp)
    weights = {n: block.get_submodule(n).weight.detach().clone() for n in layers}
    tuned = tune_block(copy.deepcopy(block), layers, x, x, kwargs, cfg, torch.Generator())
    searched = round_block(copy.deepcopy(block), layers, x, kwargs, 2, amp, searched_layers(cfg, layers))
    plain = round_block(copy.deepcopy(block), layers, x, kwargs, 2, amp)
    improved = False
    for name, w in weights.items():
        assert torch.equal(tuned.weights[name].q, searched[name].q) and torch.equal(tuned.weights[name].scales, searched[name].scales)

        def error(qw):
            return (energy[name] * (w - qw.dequantize(torch.float32)).square()).sum()

        assert error(searched[name]) <= error(plain[name]) * (1 + 1e-6), name
        improved |= bool(error(searched[name]) < error(plain[name]) * (1 - 1e-3))
    assert improved


@pytest.mark.parametrize("scheme", ["W4A16G32", "W3A16G32", "MXFP4", "NVFP4A16", "INT8", "NVFP4", "FP8_STATIC"])
def test_round_block_equals_tune_block_at_iters_0(tiny_llama, scheme):
    """RTN without a forward pass (iters 0, nothing to calibrate; one calibration pass for static activation
    scales) gives tune_block's iters-0 codes and scales, NVFP4's fused q/k/v and gate/up global scales
    included, and leaves the same dequantized weights and input quantization in the block."""
    from quantize.scheme import get_scheme
    from quantize.signround import round_block

    model, _ = load_model(str(tiny_llama))
    block = find_blocks(model).modules[0].float()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, find_blocks(model), ids, torch.device("cpu"), torch.float32)
    layers = {n: get_scheme(scheme) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    tuned_block, rounded_block = copy.deepcopy(block), copy.deepcopy(block)
    tuned = tune_block(tuned_block, layers, x, x, kwargs, TuneConfig(iters=0, nsamples=4, batch_size=2), torch.Generator())
    static = any(s.static_activations for s in layers.values())
    from quantize.model import uses_amp

    rounded = round_block(rounded_block, layers, *((x, kwargs, 2, uses_amp(None, torch.device("cpu"))) if static else ()))
    for name, w in tuned.weights.items():
        r = rounded[name]
        assert torch.equal(w.q, r.q) and torch.equal(w.scales, r.scales) and torch.equal(w.zeros, r.zeros), name
        assert w.extra.keys() == r.extra.keys() and all(torch.equal(w.extra[k], r.extra[k]) for k in w.extra)
        assert torch.equal(tuned_block.get_submodule(name).weight, rounded_block.get_submodule(name).weight)
        probe = torch.randn(3, tuned_block.get_submodule(name).in_features)
        assert torch.equal(tuned_block.get_submodule(name)(probe), rounded_block.get_submodule(name)(probe)), name


@pytest.mark.parametrize("scheme", ["W4A16G32", "NVFP4"])
def test_optimized_rtn_runs_through_the_quantizer(tiny_llama, scheme):
    """A whole model at iters 0 with init_clip: weight-only schemes search in one pass per block (its outputs
    feed the next block), NVFP4 calibrates on the quantized model as before; the codes move off plain RTN's."""
    from quantize.layer_config import plan_layers
    from quantize.quantizer import quantize_model
    from quantize.scheme import get_scheme

    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for search in (None, True):
        model, _ = load_model(str(tiny_llama))
        blocks = find_blocks(model)
        plan = plan_layers(model, blocks.prefix, get_scheme(scheme))
        cfg = TuneConfig(iters=0, nsamples=4, seqlen=32, batch_size=2, init_clip=search)
        runs[search] = quantize_model(model, blocks, plan, ids, cfg, torch.device("cpu"), progress=False)
    assert "optimized RTN" in runs[True].tune.describe() and "optimized" not in runs[None].tune.describe()
    assert runs[True].calibrated and runs[True].weights.keys() == runs[None].weights.keys()
    moved = [n for n, w in runs[True].weights.items() if not torch.equal(w.scales, runs[None].weights[n].scales)]
    assert moved


def test_nvfp4_search_over_distinct_scales_equals_the_whole_grid():
    """NVFP4's search evaluates one factor per distinct FP8 group scale (numerics_nvfp4.distinct_factors):
    it must pick, per group, exactly the factor the search over all 51 grid points picks (the first with
    the least error), including groups of zeros and of values so small the scale sits at its floor."""
    from quantize import weight_rules
    from quantize.scheme import get_scheme
    from quantize.signround import search_clip

    torch.manual_seed(1)
    scheme = get_scheme("NVFP4A16")
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    w[0, :16] = 0.0
    w[1, :16] = 1e-12
    w[2, 16:32] = 40.0
    importance = torch.rand(256) + 0.05
    grid = weight_rules.search_grid(scheme)
    candidates = weight_rules.search_candidates(w, scheme)
    assert len(candidates) < len(grid) / 3

    def error(factor):
        diff = (w - weight_rules.fake_quantize(w, scheme, 0.0, factor, factor)).reshape(16, 16, -1)
        return (importance.reshape(1, 16, -1) * diff.square()).sum(-1)

    errors = torch.stack([error(torch.full((16, 16), r)) for r in grid])
    first_best = torch.tensor(grid)[(errors == errors.min(0).values).int().argmax(0)]
    assert torch.equal(search_clip(w, scheme, importance), first_best)


def test_batches_walk_every_sample_once_per_pass():
    batches = sample_batches(10, 4, torch.Generator().manual_seed(0))
    passes = [[next(batches) for _ in range(2)] for _ in range(3)]  # 10 // 4 = 2 batches a pass, tail dropped
    for batch_pair in passes:
        seen = torch.cat(batch_pair)
        assert all(len(b) == 4 for b in batch_pair) and len(set(seen.tolist())) == 8  # no repeat within a pass
    assert not all(torch.equal(passes[0][0], p[0]) for p in passes[1:])  # reshuffled between passes
    again = sample_batches(10, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(next(again), b) for pair in passes for b in pair)  # the seed decides every batch
    with pytest.raises(ValueError, match="a batch of 8 samples cannot be drawn from 4"):
        next(sample_batches(4, 8, torch.Generator()))
