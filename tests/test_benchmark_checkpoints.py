"""The vLLM GPU benchmark's checkpoints (benchmarks/vllm_gpu.py), written at a tiny shape: every folder
loads in transformers (the quantized ones through this project's integration), names its architecture
(vLLM needs it), the forced-kernel copies carry their kernel, and the quantized models stay close to the
bf16 one (RTN of the same random weights)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401  (registers the auto-round loader)

from conftest import TOKENIZER

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("vllm_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHAPES = {"llama": ("LlamaForCausalLM", dict(hidden=256, inter=512, heads=4)),
          "qwen3_moe": ("Qwen3MoeForCausalLM", dict(hidden=256, inter=128, experts=4, top_k=2))}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_benchmark_checkpoints_load_and_agree(shape, tmp_path):
    bench = _bench()
    arch, dims = SHAPES[shape]
    bench.build_checkpoints(tmp_path, TOKENIZER, bench.SHAPES[shape](1, **dims), 1, list(bench.SCHEMES))
    names = {"bf16", *bench.SCHEMES, *(f"W4A16-{k}" for k in bench.FORCED)}
    assert {p.name for p in tmp_path.iterdir()} == names
    ids = torch.tensor([[1, 450, 1183, 310, 278, 3186, 338, 263]])
    logits = {}
    for name in sorted(names):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["architectures"] == [arch], name
        if name != "bf16" and shape == "qwen3_moe":  # the router stays 16-bit, as this project writes it
            assert cfg["quantization_config"]["extra_config"] == {"model.layers.0.mlp.gate": {"bits": 16, "data_type": "float"}}
        if name.startswith("W4A16-"):
            assert cfg["quantization_config"]["kernel"] == name.split("-", 1)[1]
            continue  # the same tensors as W4A16; the forced kernels are CUDA-only
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
        with torch.no_grad():
            logits[name] = model(ids).logits
    ref = logits.pop("bf16")
    err = {name: ((got - ref).norm() / ref.norm()).item() for name, got in logits.items()}
    assert err["W4A16"] < err["W3A16"] < err["W2A16"], err  # fewer bits, further from bf16
    assert err["W4A16"] < 0.2, err


def test_auto_round_fp_checkpoints_load_and_agree(tmp_path):
    """The plugin's FP rows: auto_round FP checkpoints of the same random weights, through our transformers
    integration (the emulation on the CPU; vLLM's Marlin or FP8 kernels on the GPU)."""
    bench = _bench()
    arch, dims = SHAPES["llama"]
    bench.build_checkpoints(tmp_path, TOKENIZER, bench.SHAPES["llama"](1, **dims), 1, list(bench.AR_ROWS))
    ids = torch.tensor([[1, 450, 1183, 310, 278, 3186, 338, 263]])
    logits = {}
    for name in ("bf16", *bench.AR_ROWS):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        if name != "bf16":
            assert cfg["quantization_config"]["quant_method"] == "auto-round", name
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
        with torch.no_grad():
            logits[name] = model(ids).logits
    ref = logits.pop("bf16")
    err = {name: ((got - ref).norm() / ref.norm()).item() for name, got in logits.items()}
    assert err["MXFP8_ar"] < err["NVFP4_ar"] < err["MXFP4_ar"] < 0.3, err  # 8 bits closest; NVFP4's finer scales beat MXFP4's
    assert err["FP8_STATIC_ar"] < 0.1, err
