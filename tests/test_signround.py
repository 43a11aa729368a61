"""SignRound on a real block of the reference model: tuning must beat round-to-nearest."""

import copy

import torch

from quantize.calib import calibration_ids
from quantize.model import capture_block_inputs, find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import _run_block
from quantize.scheme import Scheme
from quantize.signround import tune_block

from conftest import CALIB


def _first_block_setup(gutenberg):
    model, tok = load_model(str(gutenberg))
    blocks = find_blocks(model)
    ids = calibration_ids(str(CALIB), tok, nsamples=16, seqlen=128, seed=0)
    x, kwargs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), torch.float32)
    block = copy.deepcopy(blocks.modules[1]).float()  # block 1: its inputs went through block 0
    x = _run_block(blocks.modules[0].float(), x, kwargs, 8, False)
    targets = _run_block(block, x, kwargs, 8, False)
    layers = {n: Scheme(2, 128, True) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return block, layers, x, targets, kwargs


def test_signround_beats_rtn(gutenberg):
    block, layers, x, targets, kwargs = _first_block_setup(gutenberg)
    rtn = tune_block(copy.deepcopy(block), layers, x, targets, kwargs, TuneConfig(iters=0, nsamples=16, batch_size=4), torch.Generator().manual_seed(0))
    tuned_block = copy.deepcopy(block)
    tuned = tune_block(tuned_block, layers, x, targets, kwargs, TuneConfig(iters=40, nsamples=16, batch_size=4), torch.Generator().manual_seed(0))
    assert rtn.loss_before == rtn.loss_after  # iters=0 is exactly RTN
    assert tuned.loss_before == rtn.loss_after
    assert tuned.loss_after < 0.9 * rtn.loss_after, (rtn.loss_after, tuned.loss_after)
    # The block now computes with exactly the dequantized integer weights it reports.
    for name, qw in tuned.weights.items():
        assert torch.equal(tuned_block.get_submodule(name).weight, qw.dequantize(torch.float32))
        assert qw.q.max() <= 3 and qw.scales.dtype == torch.float16
