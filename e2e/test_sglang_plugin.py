"""The SGLang plugin on the CPU: SGLang's own parallel linear layers (QKV, gate_up, row-parallel) built
with our linear method at tp = 1 and 2, each rank loading the full checkpoint tensors through SGLang's
weight loaders, and its output equal to its share of the unsharded layer's; the refusals; and, in a
fresh process, the real start-up path: the entry point through ``load_plugins()``, the method detected
from config.json, SGLang's model loader building a Llama from our checkpoint, every quantized layer
agreeing with the transformers integration. SGLang cannot serve on these CPUs (serving is tested on the
GPU machine: e2e/README.md), but its layers run here with ``pip install --no-deps sglang==0.5.21``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CALIB, REPO, build_tiny_llama, random_packed_layer, reference_linear
from quantize.checkpoint import CheckpointConfig, ConfigError, layout_for
from quantize.scheme import Scheme
from sglang_env import SGLANG_PIN, import_sglang

if importlib.util.find_spec("sglang") is None:
    pytest.skip(f"SGLang is not installed (pip install --no-deps {SGLANG_PIN})", allow_module_level=True)

# Imported by the fixture below, not at collection: importing SGLang changes transformers' state (its
# config registrations), which must not reach tests collected beside this module.
sglang_linear = sglang_quantization = AutoRoundSglangConfig = register = None


@pytest.fixture(scope="module", autouse=True)
def registered():
    global sglang_linear, sglang_quantization, AutoRoundSglangConfig, register
    why = import_sglang()
    if why:
        pytest.skip(why)
    from sglang.srt.layers import linear as sglang_linear
    from sglang.srt.layers import quantization as sglang_quantization

    from quantize.integrations.sglang import register
    from quantize.integrations.sglang.config import AutoRoundSglangConfig

    register()


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 256, 4, 2, 64, 512
FORMATS = {"gptq": "auto_round:auto_gptq", "awq": "auto_round:auto_awq", "auto_round": "auto_round"}


def _config(scheme: Scheme, layout: str | None = None, **extra) -> AutoRoundSglangConfig:
    cfg = {"quant_method": "auto-round", "bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym,
           "packing_format": FORMATS[layout or layout_for(scheme)], "block_name_to_quantize": "model.layers", **extra}
    return AutoRoundSglangConfig.from_config(cfg)


def _build(kind: str, qc, prefix: str, rank: int = 0, size: int = 1):
    common = dict(bias=False, quant_config=qc, prefix=prefix, params_dtype=torch.float32, tp_rank=rank, tp_size=size)
    if kind == "qkv":
        return sglang_linear.QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, **common)
    if kind == "gate_up":
        return sglang_linear.MergedColumnParallelLinear(HIDDEN, [INTER, INTER], **common)
    return sglang_linear.RowParallelLinear(INTER, HIDDEN, **common)


def _load(layer, packed, shard_id=None):
    for name in ("qweight", "qzeros", "scales"):
        param = getattr(layer, name)
        # The loader SGLang gives packed parameters: the v2 one, which cuts this rank's shard.
        assert param.weight_loader.__func__ is type(layer).weight_loader_v2
        args = () if shard_id is None else (shard_id,)
        param.weight_loader(param, getattr(packed, name), *args)
    layer.quant_method.process_weights_after_loading(layer)


SCHEMES = [
    (Scheme(4, 128, True), "gptq"),
    (Scheme(4, 32, False), "awq"),
    (Scheme(3, 64, False), "auto_round"),
    (Scheme(2, 32, True), "gptq"),
    (Scheme(8, -1, True), "gptq"),
]


@pytest.mark.parametrize("scheme, layout", SCHEMES, ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_and_row_parallel_shards(scheme, layout, tp_size):
    qc = _config(scheme, layout)
    x_in, x_inter = torch.randn(3, HIDDEN), torch.randn(3, INTER)
    parts = {
        "qkv": [("q", HEADS * HEAD_DIM, HIDDEN), ("k", KV_HEADS * HEAD_DIM, HIDDEN), ("v", KV_HEADS * HEAD_DIM, HIDDEN)],
        "gate_up": [(0, INTER, HIDDEN), (1, INTER, HIDDEN)],
    }
    for kind, shards in parts.items():
        packed = {sid: random_packed_layer(scheme, layout, n, k, seed=i) for i, (sid, n, k) in enumerate(shards)}
        full = {sid: reference_linear(scheme, layout, packed[sid], n, k, x_in) for sid, n, k in shards}
        for rank in range(tp_size):
            layer = _build(kind, qc, f"model.layers.0.{'self_attn' if kind == 'qkv' else 'mlp'}.{kind}_proj", rank, tp_size)
            assert type(layer.quant_method).__name__ == "AutoRoundLinearMethod"
            for sid, _, _ in shards:
                for name in ("qweight", "qzeros", "scales"):
                    param = getattr(layer, name)
                    param.weight_loader(param, getattr(packed[sid], name), sid)
            layer.quant_method.process_weights_after_loading(layer)
            out = layer.quant_method.apply(layer, x_in)
            expected = torch.cat([f.chunk(tp_size, dim=-1)[rank] for f in full.values()], dim=-1)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    packed = random_packed_layer(scheme, layout, HIDDEN, INTER, seed=7)
    full = reference_linear(scheme, layout, packed, HIDDEN, INTER, x_inter)
    total = torch.zeros_like(full)
    for rank in range(tp_size):
        layer = _build("down", qc, "model.layers.0.mlp.down_proj", rank, tp_size)
        _load(layer, packed)
        total += layer.quant_method.apply(layer, x_inter.chunk(tp_size, dim=-1)[rank])
    torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-4)


def _fp_layer(scheme, n: int, k: int, seed: int) -> dict:
    """One layer's auto_round FP tensors (as quantize.export.auto_round_fp writes them) from a random weight."""
    from quantize import weight_rules

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * (1 + seed)  # parts of other ranges
    data, scales, _, extra = weight_rules.quantize_weight(w, scheme)
    return {"weight_packed" if scheme.bits == 4 else "weight": data, "weight_scale": scales, **extra}


@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16", "MXFP8A16"])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_fp_layers_shard_like_the_unsharded_layer(name, tp_size):
    """FP auto_round layers (quantize.integrations.fp_linear) in SGLang's merged and row-parallel layers:
    each rank's output is its share of the unsharded layer's, each fused part dequantized with its own
    global scale (NVFP4 parts of different ranges)."""
    from quantize.fp_layout import dequantize
    from quantize.scheme import get_scheme

    scheme = get_scheme(name)
    qc = AutoRoundSglangConfig.from_config({"quant_method": "auto-round", "bits": scheme.bits, "group_size": scheme.group_size,
                                            "sym": True, "data_type": scheme.data_type, "packing_format": "auto_round:llm_compressor",
                                            "block_name_to_quantize": "model.layers"})
    x_in, x_inter = torch.randn(3, HIDDEN), torch.randn(3, INTER)
    shards = [("q", HEADS * HEAD_DIM, HIDDEN), ("k", KV_HEADS * HEAD_DIM, HIDDEN), ("v", KV_HEADS * HEAD_DIM, HIDDEN)]
    tensors = {sid: _fp_layer(scheme, n, k, i) for i, (sid, n, k) in enumerate(shards)}
    full = {sid: x_in @ dequantize(scheme, t, torch.float32).T for sid, t in tensors.items()}
    for rank in range(tp_size):
        layer = _build("qkv", qc, "model.layers.0.self_attn.qkv_proj", rank, tp_size)
        assert type(layer.quant_method).__name__ == "AutoRoundFPLinearMethod"
        for sid, t in tensors.items():
            for key, value in t.items():
                param = getattr(layer, key)
                param.weight_loader(param, value, sid)
        layer.quant_method.process_weights_after_loading(layer)
        expected = torch.cat([f.chunk(tp_size, dim=-1)[rank] for f in full.values()], dim=-1)
        torch.testing.assert_close(layer.quant_method.apply(layer, x_in), expected, rtol=1e-4, atol=1e-4)

    down = _fp_layer(scheme, HIDDEN, INTER, seed=7)
    total = torch.zeros(3, HIDDEN)
    for rank in range(tp_size):
        layer = _build("down", qc, "model.layers.0.mlp.down_proj", rank, tp_size)
        for key, value in down.items():
            param = getattr(layer, key)
            param.weight_loader(param, value)
        layer.quant_method.process_weights_after_loading(layer)
        total += layer.quant_method.apply(layer, x_inter.chunk(tp_size, dim=-1)[rank])
    torch.testing.assert_close(total, x_inter @ dequantize(scheme, down, torch.float32).T, rtol=1e-4, atol=1e-4)


def test_fp_layers_take_the_forced_kernel():
    """The checkpoint config's ``kernel`` reaches FP layers as it reaches integer ones: a kernel that cannot
    run the layer here is refused by name, with its reason."""
    from quantize.scheme import get_scheme

    scheme = get_scheme("NVFP4A16")
    base = {"quant_method": "auto-round", "bits": 4, "group_size": 16, "sym": True, "data_type": "nv_fp",
            "packing_format": "auto_round:llm_compressor", "block_name_to_quantize": "model.layers"}
    down = _fp_layer(scheme, HIDDEN, INTER, seed=7)
    for kernel, error in (("fp_emulate", None), ("vllm_marlin_fp", "kernel 'vllm_marlin_fp' cannot run this layer")):
        layer = _build("down", AutoRoundSglangConfig.from_config({**base, "kernel": kernel}), "model.layers.0.mlp.down_proj", 0, 1)
        for key, value in down.items():
            param = getattr(layer, key)
            param.weight_loader(param, value)
        if error is None:
            layer.quant_method.process_weights_after_loading(layer)
            assert layer.quant_kernel.name == kernel
        else:
            with pytest.raises(ValueError, match=f"{error}.*needs a CUDA device"):
                layer.quant_method.process_weights_after_loading(layer)


def test_row_shard_that_splits_a_group_is_refused():
    with pytest.raises(ConfigError, match=r"down_proj: 64 inputs are not a whole number of groups of 128 .*tensor-parallel"):
        _build("down", _config(Scheme(4, 128, True)), "model.layers.0.mlp.down_proj", rank=0, size=8)


def test_fused_parts_with_different_schemes_are_refused_even_without_a_model_mapping():
    # SGLang's Llama declares no packed_modules_mapping; the plugin still knows q/k/v are fused.
    qc = _config(Scheme(4, 128, True), extra_config={"model.layers.0.self_attn.k_proj": {"bits": 8}})
    with pytest.raises(ConfigError, match=r"qkv_proj: SGLang fuses q_proj, k_proj, v_proj into one matrix.*k_proj: W8A16"):
        _build("qkv", qc, "model.layers.0.self_attn.qkv_proj")


def test_per_layer_schemes_reach_fused_layers():
    qc = _config(Scheme(4, 128, True), extra_config={f"model.layers.0.mlp.{p}": {"bits": 8, "group_size": 32} for p in ("gate_proj", "up_proj")})
    layer = _build("gate_up", qc, "model.layers.0.mlp.gate_up_proj")
    assert layer.quant_method.scheme == Scheme(8, 32, True)
    assert layer.qweight.shape == (HIDDEN * 8 // 32, 2 * INTER)


def test_unquantized_layers_stay_16_bit():
    qc = _config(Scheme(4, 128, True), extra_config={"model.layers.0.mlp.down_proj": {"bits": 16}})
    assert type(_build("down", qc, "model.layers.0.mlp.down_proj").quant_method).__name__ == "UnquantizedLinearMethod"


def test_malformed_config_is_refused_with_the_field():
    with pytest.raises(ConfigError, match="group_size=48 is not supported"):
        AutoRoundSglangConfig.from_config({"quant_method": "auto-round", "bits": 4, "group_size": 48, "sym": True,
                                           "block_name_to_quantize": "model.layers"})
    with pytest.raises(ConfigError, match="no block_name_to_quantize"):
        AutoRoundSglangConfig.from_config({"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True})


def test_override_respects_an_explicit_other_method():
    cfg = {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True}
    assert AutoRoundSglangConfig.override_quantization_method(cfg, None) == "auto-round"
    assert AutoRoundSglangConfig.override_quantization_method({**cfg, "quant_method": "auto_round"}, None) == "auto-round"
    assert AutoRoundSglangConfig.override_quantization_method(cfg, "gptq") is None
    assert AutoRoundSglangConfig.override_quantization_method({"quant_method": "gptq"}, None) is None


def test_registration_replaces_sglangs_auto_round_entries():
    assert sglang_quantization.QUANTIZATION_METHODS["auto-round"] is AutoRoundSglangConfig
    assert sglang_quantization.CPU_QUANTIZATION_METHODS["auto-round"] is AutoRoundSglangConfig
    assert sglang_linear.WEIGHT_LOADER_V2_SUPPORTED.count("AutoRoundLinearMethod") == 1
    register()  # idempotent: every SGLang process calls it
    assert sglang_linear.WEIGHT_LOADER_V2_SUPPORTED.count("AutoRoundLinearMethod") == 1


# A fresh interpreter, as SGLang's own processes are: nothing imports quantize; the entry point does.
LOAD_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from sglang_env import SGLANG_PIN, import_sglang
assert import_sglang(keep_stand_in=True) is None
import torch
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.test.layer_ut_utils import init_single_process_dist
init_single_process_dist(backend="gloo")
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.loader import DefaultModelLoader
from sglang.srt.layers.moe.topk import StandardTopKOutput

model_config = ModelConfig(sys.argv[1], dtype="float32")
model = DefaultModelLoader(LoadConfig()).load_model(model_config=model_config, device_config=DeviceConfig("cpu"))
torch.manual_seed(0)
report = {"quantization": model_config.quantization, "config": type(model.quant_config).__name__, "layers": {}, "moe": {}}
for name, module in model.named_modules():
    method = getattr(module, "quant_method", None)
    if method is not None and type(module).__name__ == "FusedMoE":  # 5 tokens, each routed to top_k distinct experts
        x = torch.randn(5, module.hidden_size)
        ids = torch.stack([torch.randperm(module.num_experts)[: module.top_k] for _ in range(5)]).int()
        w = torch.softmax(torch.randn(5, module.top_k), -1)
        out = module(x, StandardTopKOutput(w, ids, torch.zeros(5, module.num_experts)))
        report["moe"][name] = {"method": type(method).__name__, "x": x.tolist(), "ids": ids.tolist(), "w": w.tolist(), "out": out.tolist()}
    if method is None or not hasattr(module, "input_size") or "layers." not in name:
        continue
    x = torch.randn(2, module.input_size)
    out = method.apply(module, x)
    report["layers"][name] = {"method": type(method).__name__, "x": x.tolist(), "out": out.tolist()}
print("REPORT" + json.dumps(report))
"""


def _sglang_layers(ckpt: Path) -> dict:
    env = {**os.environ, "QUANTIZE_LLM_NO_AUTOLOAD": "1"}
    run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(ckpt), str(REPO / "e2e")], capture_output=True,
                         text=True, cwd=ckpt, env=env, timeout=600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("REPORT")), None)
    assert run.returncode == 0 and line, run.stderr[-4000:]
    return json.loads(line[len("REPORT"):])


# Intel AutoRound 0.16.1 writes a checkpoint (W4 g32 asym: its AWQ packing), in an interpreter without quantize.
INTEL_QUANTIZE = r"""
import sys
from pathlib import Path
from auto_round import AutoRound
from transformers import AutoTokenizer
model, calib, out = sys.argv[1:4]
texts = [t for t in Path(calib).read_text().split("\n\n") if len(t) > 200][:8]
ar = AutoRound(model, tokenizer=AutoTokenizer.from_pretrained(model), bits=4, group_size=32, sym=False, iters=0,
               disable_opt_rtn=True, disable_model_free=True, amp=False, dataset=texts, nsamples=4, seqlen=32,
               batch_size=2, device_map="cpu", seed=0)
ar.quantize_and_save(out, format="auto_round")
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A uniform W4 sym (gptq layout), a mixed checkpoint (W3 asym native layout, an 8-bit block, a 16-bit
    down_proj), NVFP4 (static FP4 activations) and MXFP8, quantized by the CLI from one tiny Llama, and
    Intel's W4 asym of the same model."""
    root = tmp_path_factory.mktemp("sglang")
    model = build_tiny_llama(root / "model", hidden=128, intermediate=256, layers=2)
    mixed = {"layers.1.": {"bits": 8, "group_size": 32}, "layers.0.mlp.down_proj": {"bits": 16}}
    runs = {"w4": ["--scheme", "W4A16G32"], "mixed": ["--scheme", "W3A16G32", "--asym", "--layer_config", json.dumps(mixed)],
            "nvfp4": ["--scheme", "NVFP4"], "mxfp8": ["--scheme", "MXFP8"]}
    for name, args in runs.items():
        subprocess.run([sys.executable, "-m", "quantize", str(model), *args, "--iters", "0", "--nsamples", "2", "--batch_size", "2", "--seqlen", "32",
                        "--dataset", str(CALIB), "--no-eval", "--quiet", "--output_dir", str(root / name)],
                       check=True, cwd=REPO, timeout=600)
    found = {name: root / name for name in runs}
    if importlib.util.find_spec("auto_round") is not None:
        env = {**os.environ, "QUANTIZE_LLM_NO_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", INTEL_QUANTIZE, str(model), str(CALIB), str(root / "intel")], check=True,
                       cwd=root, env=env, capture_output=True, timeout=600)
        found["intel"] = next((root / "intel").glob("*/config.json")).parent
    return found


@pytest.mark.parametrize("name", ["w4", "mixed", "intel", "nvfp4", "mxfp8"])
def test_sglang_loads_checkpoints_through_the_entry_point(checkpoints, name):
    from transformers import AutoModelForCausalLM

    if name not in checkpoints:
        pytest.skip("Intel's auto-round is not installed (pip install auto-round==0.16.1)")
    ckpt = checkpoints[name]
    report = _sglang_layers(ckpt)
    assert report["quantization"] == "auto-round" and report["config"] == "AutoRoundSglangConfig"
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    modules = dict(reference.named_modules())
    layout = CheckpointConfig.from_dict(json.loads((ckpt / "config.json").read_text())["quantization_config"]).layout
    assert len(report["layers"]) == 2 * 4
    for layer_name, got in report["layers"].items():
        parent, _, leaf = layer_name.rpartition(".")
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
        x = torch.tensor(got["x"])
        with torch.no_grad():
            expected = torch.cat([modules[f"{parent}.{p}"](x) for p in parts], dim=-1)
        kind = type(modules[f"{parent}.{parts[0]}"]).__name__
        method = {"QuantLinear": "AutoRoundLinearMethod", "FPQuantLinear": "AutoRoundFPLinearMethod"}.get(kind, "UnquantizedLinearMethod")
        assert got["method"] == method, layer_name
        torch.testing.assert_close(torch.tensor(got["out"]), expected, rtol=1e-4, atol=1e-4, msg=layer_name)
    if name == "intel":
        assert layout == "awq"
    if name == "mixed":
        assert layout == "auto_round"
        assert report["layers"]["model.layers.0.mlp.down_proj"]["method"] == "UnquantizedLinearMethod"


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """A tiny Qwen3-MoE (8 experts, top 2) quantized by the CLI: W4 sym (gptq packing), W3 asym (native),
    MXFP4 weights and NVFP4 weights and activations."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_moe import build

    root = tmp_path_factory.mktemp("sglang-moe")
    src = build("qwen3_moe", root / "src")
    runs = {"w4": ["--scheme", "W4A16G32"], "w3-asym": ["--scheme", "W3A16G32", "--asym"], "mxfp4": ["--scheme", "MXFP4A16"],
            "nvfp4": ["--scheme", "NVFP4"]}
    for name, args in runs.items():
        subprocess.run([sys.executable, "-m", "quantize", str(src), *args, "--iters", "0", "--nsamples", "2", "--batch_size", "2",
                        "--seqlen", "32", "--dataset", str(CALIB), "--no-eval", "--quiet", "--output_dir", str(root / name)],
                       check=True, cwd=REPO, timeout=600)
    return {name: root / name for name in runs}


@pytest.mark.parametrize("name", ["w4", "w3-asym", "mxfp4", "nvfp4"])
def test_sglang_serves_moe_experts_through_the_plugin(moe_checkpoints, name):
    """SGLang's FusedMoE layers load the per-expert tensors through SGLang's expert loader into the plugin's
    MoE method (every bit width and layout, where SGLang's own auto-round path takes 4/8-bit sym only), and
    their output for routed tokens equals the transformers integration's experts on the same routing; the
    routers stay 16-bit."""
    from transformers import AutoModelForCausalLM

    ckpt = moe_checkpoints[name]
    report = _sglang_layers(ckpt)
    assert report["config"] == "AutoRoundSglangConfig" and len(report["moe"]) == 2
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    modules = dict(reference.named_modules())
    for layer_name, got in report["moe"].items():
        assert got["method"] == "AutoRoundMoEMethod", layer_name
        experts = modules[layer_name]
        linear = "FPQuantLinear" if name.endswith("fp4") else "QuantLinear"
        assert type(experts).__name__ == "UnfusedExperts" and type(experts.expert(0).gate_proj).__name__ == linear
        with torch.no_grad():
            expected = experts(torch.tensor(got["x"]), torch.tensor(got["ids"]).long(), torch.tensor(got["w"]))
        torch.testing.assert_close(torch.tensor(got["out"]), expected, rtol=1e-4, atol=1e-4, msg=layer_name)
    routers = [n for n in report["layers"] if n.endswith("mlp.gate")]
    assert routers and all(report["layers"][n]["method"] == "UnquantizedLinearMethod" for n in routers)
