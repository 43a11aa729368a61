"""--quant-lm-head: a planned lm_head (not tied to the embeddings) is rounded to nearest after the blocks, with
the scheme's own rules, and every format either stores it quantized, stores it dequantized and says so, or
refuses naming the fix."""

from __future__ import annotations

import pytest
import torch

import quantize  # noqa: F401  (registers the transformers integration)
from quantize.calib import calibration_ids
from quantize.checkpoint import layout_for
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

from conftest import CALIB, build_tiny_llama

PROMPT = torch.tensor([[1, 450, 1183, 310, 278, 3186, 338, 263, 2217, 310, 278]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("head") / "llama", hidden=128, intermediate=256, layers=2)


def quantized(path, scheme, iters=1, **tune):
    model, tok = load_model(str(path))
    original = model.lm_head.weight.detach().clone()
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, scheme, quant_lm_head=True, layout_for=layout_for)
    assert "lm_head" in plan.quantize
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    cfg = TuneConfig(iters=iters, nsamples=4, seqlen=32, batch_size=2, **tune)
    result = quantize_model(model, blocks, plan, ids, cfg, torch.device("cpu"), progress=False)
    return model, tok, result, original


@pytest.mark.parametrize("iters", [0, 1])
def test_planned_lm_head_is_quantized(llama, iters):
    model, _, result, original = quantized(llama, Scheme(4, 32, True), iters=iters)
    assert "lm_head" in result.weights
    qw = result.weights["lm_head"]
    assert qw.scheme == Scheme(4, 32, True)
    assert torch.equal(model.lm_head.weight, qw.dequantize(model.dtype))
    assert not torch.equal(model.lm_head.weight, original)
