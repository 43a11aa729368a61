"""--quant-lm-head: a planned lm_head (not tied to the embeddings) is rounded to nearest after the blocks, with
the scheme's own rules, and every format either stores it quantized, stores it dequantized and says so, or
refuses naming the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_static_activation_scale_is_calibrated_on_lm_heads_inputs(llama):
    """FP8_STATIC: lm_head's input scale comes from the last block's (quantized) outputs through the final
    norm, i.e. what lm_head sees when the quantized model runs, not a unit scale."""
    from quantize.scheme import get_scheme

    scheme = get_scheme("FP8_STATIC")
    model, tok, result, _ = quantized(llama, scheme, iters=0)
    qw = result.weights["lm_head"]
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().amax().float()), prepend=True)
    with torch.no_grad():
        model(calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0))
    handle.remove()
    assert torch.allclose(qw.extra["input_scale"], torch.stack(seen).max() / 448, rtol=2e-2)
    assert torch.equal(model.lm_head.weight, qw.dequantize(model.dtype))


def test_auto_round_reload_gives_the_same_logits(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from quantize.export.auto_round import save_auto_round
    from quantize.integrations.transformers.modules import QuantLinear

    model, tok, result, _ = quantized(llama, Scheme(4, 32, True))
    save_auto_round(model, tok, result, Scheme(4, 32, True), tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    # Intel's layout: lm_head named in extra_config with its whole scheme, its tensors packed like the blocks'
    assert cfg["extra_config"]["lm_head"]["bits"] == 4 and cfg["extra_config"]["lm_head"]["group_size"] == 32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        want, got = model(PROMPT).logits, loaded(PROMPT).logits
    if loaded.lm_head.kernel.name == "torch":
        assert torch.equal(want, got)
    else:  # CPU int4 GEMMs round in their own order (test_roundtrip)
        assert ((got - want).float().norm() / want.float().norm()).item() < 2e-2


INTEL_LOAD = r'''
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu")
assert hasattr(m.lm_head, "qweight"), type(m.lm_head)
with torch.no_grad():
    torch.save(m(torch.tensor(%s)).logits.float(), sys.argv[2])
assert "quantize" not in sys.modules
'''


def test_intels_loader_loads_our_quantized_lm_head(llama, tmp_path):
    pytest.importorskip("auto_round")
    from quantize.export.auto_round import save_auto_round

    model, tok, result, _ = quantized(llama, Scheme(4, 32, True))
    save_auto_round(model, tok, result, Scheme(4, 32, True), tmp_path / "ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTIZE_LLM_NO_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", INTEL_LOAD % PROMPT.tolist(), str(tmp_path / "ckpt"), str(tmp_path / "l.pt")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    intel = torch.load(tmp_path / "l.pt")
    with torch.no_grad():
        ours = model.float()(PROMPT).logits
    # Intel computes in float16 on the CPU (test_intel_compat: LOGIT_RTOL)
    assert (ours - intel).abs().max() <= 5e-3 * intel.abs().max()


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """One CLI run (widths 256/512: every gguf type fits) with --quant-lm-head, written in every integer format."""
    work = tmp_path_factory.mktemp("formats")
    src = build_tiny_llama(work / "llama", hidden=256, intermediate=512, layers=2)
    out = work / "out"
    r = run_cli(src, "--scheme", "W4A16G32", "--iters", "1", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2",
                "--dataset", CALIB, "--quant-lm-head", "--format", "auto_round,auto_gptq,auto_awq,llm_compressor,gguf:q4_k_m,fake",
                "--output-dir", out, "--quiet", "--device", "cpu", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])


def test_cli_says_lm_head_was_rounded_to_nearest(formats):
    _, r = formats
    assert "lm_head: W4A16G32, rounded to nearest" in r.stdout  # beside the blocks' lines
    assert "quantized   14 linear layers in 2 blocks, and lm_head rounded to nearest (not tuned)" in r.stdout
    assert "16-bit" not in r.stdout.split("summary")[1].split("size")[0]  # lm_head is not listed as kept


def _config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _tensors(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_gptq_stores_lm_head_packed_and_says_so(formats):
    out, _ = formats
    assert _config(out / "auto_gptq")["lm_head"] is True  # GPTQModel's and vLLM's flag (lm_head_quantized)
    t = _tensors(out / "auto_gptq")
    assert {"lm_head.qweight", "lm_head.qzeros", "lm_head.scales", "lm_head.g_idx"} <= set(t) and "lm_head.weight" not in t


def test_awq_keeps_lm_head_dequantized_and_not_converted(formats):
    """AutoAWQ and transformers' AWQ quantize only the blocks' linears: lm_head is stored as its dequantized
    weight (exactly what the run computed with) and listed in modules_to_not_convert."""
    out, _ = formats
    assert "lm_head" in _config(out / "auto_awq")["modules_to_not_convert"]
    awq, fake = _tensors(out / "auto_awq"), _tensors(out / "fake")
    assert "lm_head.qweight" not in awq and torch.equal(awq["lm_head.weight"], fake["lm_head.weight"])


def test_llm_compressor_targets_lm_head_and_loads(formats):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out, _ = formats
    cfg = _config(out / "llm_compressor")
    assert "lm_head" not in cfg["ignore"] and cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "lm_head.weight_packed" in _tensors(out / "llm_compressor")
    # Decompressed on load (as test_export_formats): the weight transformers computes with on a CPU, in float32;
    # the fake checkpoint holds our dequantized weights in the model's bf16. Ours, up to that one rounding.
    ct = AutoModelForCausalLM.from_pretrained(out / "llm_compressor", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(run_compressed=False))
    fake = AutoModelForCausalLM.from_pretrained(out / "fake", dtype=torch.float32)
    assert torch.equal(ct.lm_head.weight.to(torch.bfloat16).float(), fake.lm_head.weight)
    with torch.no_grad():
        a, b = ct(PROMPT).logits, fake(PROMPT).logits
    assert ((a - b).norm() / b.norm()).item() < 5e-3


def test_gguf_stores_output_weight_quantized(formats):
    import gguf

    out, _ = formats
    reader = gguf.GGUFReader(next((out / "gguf-q4_k_m").glob("*.gguf")))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q4_K"


def test_tied_lm_head_stays_16_bit_with_its_reason(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_tiny_llama(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(src)
    r = run_cli(src, "--scheme", "W4A16G32", "--iters", "0", "--dataset", CALIB, "--quant-lm-head", "--output-dir",
                tmp_path / "out", "--quiet", "--device", "cpu", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lm_head (lm_head shares its weight with the input embeddings)" in r.stdout
    assert "extra_config" not in _config(tmp_path / "out")


def test_vllm_and_sglang_plugins_refuse_a_quantized_lm_head(formats):
    """vLLM's ParallelLMHead pads and shards the vocabulary; our plugins do not serve a packed lm_head yet and
    say so at load, naming the fixes (test_vllm_plugin drives vLLM itself)."""
    from quantize.checkpoint import CheckpointConfig, ConfigError
    from quantize.integrations.packed_linear import refuse_quantized_lm_head

    out, _ = formats
    config = CheckpointConfig.from_dict(_config(out / "auto_round"))
    with pytest.raises(ConfigError, match="quantized lm_head is not served.*without --quant-lm-head, or load it with transformers"):
        refuse_quantized_lm_head(config, "lm_head", "vLLM")
