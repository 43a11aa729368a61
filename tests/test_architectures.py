"""Every supported decoder family: quantize a tiny random model, save, load, same logits."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401
from quantize.calib import calibration_ids
from quantize.export.auto_round import save_auto_round
from quantize.integrations.transformers.modules import QuantLinear
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

from conftest import CALIB, TOKENIZER

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=8192, max_position_embeddings=256)
FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=0)),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(family, tmp_path):
    cls_name, extra = FAMILIES[family]
    cfg_cls = getattr(transformers, cls_name)
    kwargs = {**COMMON, **extra}
    if family == "opt":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("intermediate_size",)}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg_cls(**kwargs)).to(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(src)

    model, tok = load_model(str(src))
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, Scheme(4, 32, True))
    assert plan.quantize and all(n.startswith(blocks.prefix) for n in plan.quantize)
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=2, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    save_auto_round(model, tok, result, Scheme(4, 32, True), tmp_path / "q")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(result.weights)
    prompt = ids[:1, :16]
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, loaded(prompt).logits)
