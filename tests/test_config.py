"""Schemes, presets, layer plans and the checkpoint's quantization_config."""

import pytest

from quantize.checkpoint import CheckpointConfig, ConfigError, packing_format_for
from quantize.layer_config import plan_layers
from quantize.model import UserError, find_blocks, load_model
from quantize.presets import PRESETS, TuneConfig, get_preset
from quantize.scheme import SCHEMES, Scheme, get_scheme


def test_scheme_presets():
    assert get_scheme("W4A16") == Scheme(4, 128, True)
    assert get_scheme("w2a16g64") == Scheme(2, 64, True)
    assert get_scheme("W3A16", sym=False, group_size=32) == Scheme(3, 32, False)
    assert {"W2A16", "W3A16", "W4A16", "W8A16", "W4A16G32", "W8A16G64"} <= set(SCHEMES)


@pytest.mark.parametrize("bad, match", [({"bits": 5}, "bits=5"), ({"group_size": 48}, "group_size=48"), ({"data_type": "fp"}, "data_type")])
def test_scheme_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        Scheme(**bad)
    with pytest.raises(ValueError, match="unknown scheme"):
        get_scheme("W5A16")


def test_tune_presets():
    assert PRESETS["auto-round"].iters == 200 and PRESETS["auto-round"].learning_rate == pytest.approx(1 / 200)
    best, light = PRESETS["auto-round-best"], PRESETS["auto-round-light"]
    assert best.iters == 1000 and best.nsamples == 512
    assert light.iters == 50 and light.learning_rate == 5e-3 and light.minmax_learning_rate == 5e-3
    assert get_preset("auto-round", iters=50).learning_rate == pytest.approx(0.02)
    # iters 0 is RTN under any preset: a small calibration set (only the logged block losses use it),
    # unless asked for
    rtn = get_preset("auto-round", iters=0)
    assert (rtn.nsamples, rtn.seqlen) == (PRESETS["rtn"].nsamples, PRESETS["rtn"].seqlen) == (8, 512)
    assert get_preset("auto-round", iters=0, nsamples=16).nsamples == 16
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("fast")
    with pytest.raises(ValueError, match="exceeds nsamples"):
        TuneConfig(nsamples=4, batch_size=8)


def test_packing_format_choice():
    assert packing_format_for([Scheme(4, 128, True), Scheme(8, 128, True)]) == "auto_round:auto_gptq"
    assert packing_format_for([Scheme(4, 128, False)]) == "auto_round:auto_awq"
    assert packing_format_for([Scheme(3, 128, False)]) == "auto_round"
    assert packing_format_for([Scheme(4, 128, False), Scheme(4, 128, True)]) == "auto_round"


BASE = {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True, "packing_format": "auto_round:auto_gptq",
        "block_name_to_quantize": "model.layers", "iters": 200}


def test_checkpoint_config_layer_schemes():
    cfg = CheckpointConfig.from_dict({**BASE, "extra_config": {
        "model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.q_proj": {"bits": 16}, r"lm_head": {"bits": 4, "group_size": 32}}})
    assert cfg.layer_scheme("model.layers.3.mlp.up_proj") == Scheme(4, 128, True)
    assert cfg.layer_scheme("model.layers.0.mlp.down_proj") == Scheme(8, 128, True)
    assert cfg.layer_scheme("model.layers.1.self_attn.q_proj") is None
    assert cfg.layer_scheme("lm_head") == Scheme(4, 32, True)
    assert cfg.layer_scheme("model.embed_tokens") is None
    assert cfg.to_dict()["iters"] == 200 and CheckpointConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, match", [
    ({"bits": 5}, "bits=5"),
    ({"packing_format": "auto_round:marlin"}, "packing_format='auto_round:marlin'"),
    ({"group_size": 100}, "group_size=100"),
    ({"block_name_to_quantize": None}, "block_name_to_quantize"),
    ({"extra_config": {"model.layers.0.mlp.up_proj": {"bits": 6}}}, r"extra_config\['model.layers.0.mlp.up_proj'\]: bits=6"),
    ({"act_bits": 8}, "act_bits=8"),
    ({"quant_method": "gptq"}, "quant_method"),
])
def test_checkpoint_config_refuses(change, match):
    with pytest.raises(ConfigError, match=match):
        CheckpointConfig.from_dict({**BASE, **change})
    with pytest.raises(ConfigError, match="'sym'"):
        CheckpointConfig.from_dict({k: v for k, v in BASE.items() if k != "sym"})


def test_layer_plan(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, Scheme(4, 32, True),
                       layer_config={"mlp.down_proj": {"bits": 8}, r"layers\.1\.self_attn\.q_proj": {"bits": 16}},
                       ignore=["layers.0.self_attn.o_proj"])
    assert len(plan.quantize) == 14 - 2
    assert plan.quantize["model.layers.0.mlp.down_proj"] == Scheme(8, 32, True)
    assert plan.keep["model.layers.1.self_attn.q_proj"] == "layer_config keeps it 16-bit"
    assert plan.keep["model.layers.0.self_attn.o_proj"] == "in the ignore list"
    assert "lm_head" in plan.keep["lm_head"]
    with_head = plan_layers(model, blocks.prefix, Scheme(4, 32, True), quant_lm_head=True)
    assert "lm_head" in with_head.quantize


def test_layer_plan_keeps_layers_a_group_does_not_divide(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    blocks = find_blocks(model)
    # in_features 64 (attention, gate/up) vs 128 (down_proj): group 128 only fits down_proj
    plan = plan_layers(model, blocks.prefix, Scheme(4, 128, True))
    assert set(plan.quantize) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert plan.keep["model.layers.0.self_attn.q_proj"] == "in_features 64 is not a multiple of group_size 128"
    with pytest.raises(UserError, match="no layer can be quantized"):
        plan_layers(model, blocks.prefix, Scheme(4, 128, True), layer_config={"down_proj": {"bits": 16}})
