"""MTP layers (DeepSeek-V3's extra layer): read from the source shards that transformers does not build,
projections RTN-quantized, eh_proj / shared head / router kept 16-bit, all written into the checkpoint."""

import json

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401
from quantize.calib import calibration_ids
from quantize.export.auto_round import save_auto_round
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.numerics import dequantize, quantize_weight
from quantize.packing import PackedLinear, unpack
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

from conftest import CALIB, TOKENIZER
from test_moe import COMMON, MOE, portable


def add_mtp_layer(path, hidden, vocab, seed=1, **cfg_over):
    """Append an MTP layer model.layers.{N}.* to the DeepSeek-V3 checkpoint in ``path`` (N = its layer
    count), laid out as DeepSeek's: a MoE decoder layer plus enorm, hnorm, eh_proj and shared_head.
    Returns the added tensors."""
    cls_name, extra = MOE["deepseek_v3"]
    config = json.loads((path / "config.json").read_text())
    n = config["num_hidden_layers"]
    cfg = {**COMMON, **extra, **cfg_over}
    torch.manual_seed(seed)
    bigger = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**{**cfg, "num_hidden_layers": n + 1})).to(torch.bfloat16)
    layer = {k: v.detach().clone() for k, v in bigger.state_dict().items() if k.startswith(f"model.layers.{n}.")}
    layer = {k: v for k, v in layer.items() if "experts.gate_up_proj" not in k and "experts.down_proj" not in k}
    e = bigger.model.layers[n].mlp.experts  # per-expert tensors, as checkpoints store them
    for i in range(e.gate_up_proj.shape[0]):
        gate, up = e.gate_up_proj[i].detach().chunk(2, dim=0)
        layer[f"model.layers.{n}.mlp.experts.{i}.gate_proj.weight"] = gate.contiguous()
        layer[f"model.layers.{n}.mlp.experts.{i}.up_proj.weight"] = up.contiguous()
        layer[f"model.layers.{n}.mlp.experts.{i}.down_proj.weight"] = e.down_proj[i].detach().contiguous()
    p = f"model.layers.{n}."
    layer.update({
        p + "enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "eh_proj.weight": (torch.randn(hidden, 2 * hidden) * 0.02).to(torch.bfloat16),
        p + "shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "shared_head.head.weight": (torch.randn(vocab, hidden) * 0.02).to(torch.bfloat16),
    })
    state = load_file(path / "model.safetensors")
    save_file({**state, **layer}, path / "model.safetensors", metadata={"format": "pt"})
    return layer


def build_with_mtp(path):
    """A tiny DeepSeek-V3 (2 layers) whose checkpoint also holds an MTP layer model.layers.2.*."""
    cls_name, extra = MOE["deepseek_v3"]
    cfg = dict(COMMON, **extra, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**cfg)).to(torch.bfloat16)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    return path, add_mtp_layer(path, cfg["hidden_size"], cfg["vocab_size"])


def test_mtp_layer_written(tmp_path):
    src, mtp = build_with_mtp(tmp_path / "src")
    model, tok = load_model(str(src))  # transformers builds 2 layers and drops model.layers.2.*
    assert len(model.model.layers) == 2
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    ids = calibration_ids(str(CALIB), tok, nsamples=2, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=0, nsamples=2, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    out = save_auto_round(model, tok, result, scheme, tmp_path / "q")

    saved = load_file(out / "model.safetensors")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    for kept in ("eh_proj", "shared_head.head", "mlp.gate"):
        assert saved[f"model.layers.2.{kept}.weight"].dtype == torch.bfloat16
        assert qcfg["extra_config"][f"model.layers.2.{kept}"] == {"bits": 16}
    for norm in ("enorm", "hnorm", "shared_head.norm", "input_layernorm"):
        assert f"model.layers.2.{norm}.weight" in saved
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in saved
    projections = [k[: -len(".weight")] for k, t in mtp.items() if k.endswith("_proj.weight") and "eh_proj" not in k]
    assert any(".experts.3." in p for p in projections) and any("self_attn" in p for p in projections)
    for name in projections:  # RTN of the source weight, stored packed (gptq layout) under the same name
        w = mtp[f"{name}.weight"]
        n, k = w.shape
        if k % 32:  # kv_b_proj: 16 inputs (kv_lora_rank), not a whole group
            assert f"{name}.weight" in saved and qcfg["extra_config"][name] == {"bits": 16}
            continue
        assert f"{name}.weight" not in saved
        q, s, z = unpack("gptq", PackedLinear(saved[f"{name}.qweight"], saved[f"{name}.qzeros"], saved[f"{name}.scales"]), 4, k, n)
        torch.testing.assert_close(dequantize(q, s, z), dequantize(*quantize_weight(w.float(), 4, 32, True)), rtol=0, atol=0)

    loaded = portable(AutoModelForCausalLM.from_pretrained(out))  # the main model still loads, same logits
    with torch.no_grad():
        assert torch.equal(model(ids[:1, :16]).logits, loaded(ids[:1, :16]).logits)
