"""The vLLM plugin's packed parameters under tensor parallelism, at the weight-loading level: vLLM's own
parallel linear layers (QKV, gate_up, row-parallel) are built for tp = 2 with our linear method, every
rank loads the full checkpoint tensors through vLLM's weight loaders, and each rank's output equals its
share of the unsharded layer's output. Runs without a distributed setup (the rank is patched in)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor import parameter as vllm_parameter  # noqa: E402
from vllm.model_executor.layers import linear as vllm_linear  # noqa: E402

from quantize.checkpoint import CheckpointConfig, ConfigError, layout_for  # noqa: E402
from quantize.integrations.vllm.config import AutoRoundVllmConfig  # noqa: E402
from conftest import random_packed_layer, reference_linear  # noqa: E402
from quantize.scheme import Scheme  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 256, 4, 2, 64, 512


def _config(scheme: Scheme, layout: str | None = None) -> AutoRoundVllmConfig:
    fmt = {"gptq": "auto_round:auto_gptq", "awq": "auto_round:auto_awq", "auto_round": "auto_round"}[layout or layout_for(scheme)]
    cfg = CheckpointConfig(scheme.bits, scheme.group_size, scheme.sym, fmt, ["model.layers"])
    qc = AutoRoundVllmConfig(cfg)
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return qc


@pytest.fixture
def tp(monkeypatch):
    """Pretend to be ``rank`` of a tensor-parallel group of ``size``."""

    def set_rank(rank: int, size: int):
        for module in (vllm_linear, vllm_parameter):
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: size)

    return set_rank


def _build(kind: str, qc, prefix: str):
    with set_current_vllm_config(VllmConfig()):
        if kind == "qkv":
            return vllm_linear.QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, quant_config=qc, prefix=prefix,
                                                 params_dtype=torch.float32)
        if kind == "gate_up":
            return vllm_linear.MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=qc, prefix=prefix,
                                                          params_dtype=torch.float32)
        return vllm_linear.RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=qc, prefix=prefix, params_dtype=torch.float32)


SCHEMES = [
    (Scheme(4, 128, True), "gptq"),
    (Scheme(4, 32, False), "awq"),
    (Scheme(3, 64, False), "auto_round"),
    (Scheme(2, 32, True), "gptq"),
    (Scheme(8, -1, True), "gptq"),
]


@pytest.mark.parametrize("scheme, layout", SCHEMES, ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_and_row_parallel_shards(tp, scheme, layout, tp_size):
    qc = _config(scheme, layout)
    x_in = torch.randn(3, HIDDEN)
    x_inter = torch.randn(3, INTER)
    parts = {
        "qkv": [("q", HEADS * HEAD_DIM, HIDDEN), ("k", KV_HEADS * HEAD_DIM, HIDDEN), ("v", KV_HEADS * HEAD_DIM, HIDDEN)],
        "gate_up": [(0, INTER, HIDDEN), (1, INTER, HIDDEN)],
    }
    for kind, shards in parts.items():
        packed = {sid: random_packed_layer(scheme, layout, n, k, seed=i) for i, (sid, n, k) in enumerate(shards)}
        full = {sid: reference_linear(scheme, layout, packed[sid], n, k, x_in) for sid, n, k in shards}
        for rank in range(tp_size):
            tp(rank, tp_size)
            layer = _build(kind, qc, f"model.layers.0.{'self_attn' if kind == 'qkv' else 'mlp'}.{kind}_proj")
            assert type(layer.quant_method).__name__ == "AutoRoundLinearMethod"
            for sid, _, _ in shards:
                for name in ("qweight", "qzeros", "scales"):
                    layer.weight_loader(getattr(layer, name), getattr(packed[sid], name), sid)
            layer.quant_method.process_weights_after_loading(layer)
            out = layer.quant_method.apply(layer, x_in)
            expected = torch.cat([f.chunk(tp_size, dim=-1)[rank] for f in full.values()], dim=-1)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    packed = random_packed_layer(scheme, layout, HIDDEN, INTER, seed=7)
    full = reference_linear(scheme, layout, packed, HIDDEN, INTER, x_inter)
    total = torch.zeros_like(full)
    for rank in range(tp_size):
        tp(rank, tp_size)
        layer = _build("down", qc, "model.layers.0.mlp.down_proj")
        for name in ("qweight", "qzeros", "scales"):
            layer.weight_loader(getattr(layer, name), getattr(packed, name))
        layer.quant_method.process_weights_after_loading(layer)
        total += layer.quant_method.apply(layer, x_inter.chunk(tp_size, dim=-1)[rank])
    torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-4)


def test_row_shard_that_splits_a_group_is_refused(tp):
    tp(0, 8)  # 512 inputs / 8 ranks = 64 per rank: half a group of 128
    qc = _config(Scheme(4, 128, True))
    with pytest.raises(ConfigError, match=r"down_proj: 64 inputs are not a whole number of groups of 128 .*tensor-parallel"):
        _build("down", qc, "model.layers.0.mlp.down_proj")


def test_merged_parts_with_different_schemes_are_refused(tp):
    tp(0, 1)
    qc = _config(Scheme(4, 128, True))
    qc.checkpoint.extra_config["model.layers.0.self_attn.k_proj"] = {"bits": 8}
    with pytest.raises(ConfigError, match=r"qkv_proj: vLLM fuses q_proj, k_proj, v_proj into one matrix.*k_proj: W8A16"):
        _build("qkv", qc, "model.layers.0.self_attn.qkv_proj")


def test_unquantized_parts_stay_16_bit(tp):
    tp(0, 1)
    qc = _config(Scheme(4, 128, True))
    qc.checkpoint.extra_config["model.layers.0.mlp.down_proj"] = {"bits": 16}
    layer = _build("down", qc, "model.layers.0.mlp.down_proj")
    assert type(layer.quant_method).__name__ == "UnquantizedLinearMethod"


def test_override_respects_an_explicit_other_method():
    cfg = {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True}
    assert AutoRoundVllmConfig.override_quantization_method(cfg, None) == "auto-round"
    assert AutoRoundVllmConfig.override_quantization_method(cfg, "auto-round") == "auto-round"
    assert AutoRoundVllmConfig.override_quantization_method(cfg, "inc") is None
    assert AutoRoundVllmConfig.override_quantization_method({"quant_method": "gptq"}, None) is None


def test_vllm_name_mapping_renames_blocks_and_overrides():
    from vllm.model_executor.models.utils import WeightsMapper

    qc = _config(Scheme(4, 128, True))
    qc.checkpoint.extra_config["model.layers.0.mlp.down_proj"] = {"bits": 8}
    qc.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
    assert qc.checkpoint.block_name_to_quantize == ["language_model.model.layers"]
    assert qc.checkpoint.layer_scheme("language_model.model.layers.0.mlp.down_proj") == Scheme(8, 128, True)
    assert qc.checkpoint.layer_scheme("language_model.model.layers.1.mlp.down_proj") == Scheme(4, 128, True)
