"""Intel AutoRound 0.16.1 compatibility of the FP auto_round checkpoints (MXFP4, MXFP8, NVFP4, FP8_STATIC),
both ways, on a tiny random Llama (hidden 128, 2 layers):

- us -> Intel: our RTN checkpoints load through Intel's loader (its MXFP4QuantLinear, MXFP8QuantLinear,
  NVFP4QuantLinear, WeightFP8ActFP8StaticQuantLinear) and give our logits;
- Intel -> us: Intel's RTN checkpoints (``scheme=NAME, iters=0, disable_opt_rtn=True``) load through ours
  (FPQuantLinear) and give Intel's logits.

Both sides compute in float32 (in bfloat16 a last-bit difference in a layer's output flips 4-bit activation
codes downstream and the logits of a random model wander by a few percent). MX and NVFP4 agree to float32
rounding (Intel dequantizes NVFP4 as ``q * (1/gs) * s`` where we compute ``q * (s/gs)``). FP8_STATIC agrees
within a few percent only: Intel's CPU module holds ``input_scale`` in bfloat16 and divides the bfloat16
input by it in bfloat16 before the FP8 cast (a double rounding that changes ~1 activation code in 4), where we
compute ``x / input_scale`` in float32 as vLLM's kernels do; the weights agree to the scales' bfloat16 rounding.
Intel's code runs in a subprocess with QUANTIZE_LLM_NO_AUTOLOAD=1; that its own modules computed is checked by class name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("auto_round")

import quantize  # noqa: E402,F401
from quantize.cli import main  # noqa: E402

from conftest import CALIB, build_tiny_llama  # noqa: E402

SCHEMES = ["MXFP4", "MXFP8", "NVFP4", "FP8_STATIC"]
RTOL = {"MXFP4": 1e-5, "MXFP8": 1e-5, "NVFP4": 1e-5, "FP8_STATIC": 0.06}
INTEL_MODULES = {"MXFP4": "MXFP4QuantLinear", "MXFP8": "MXFP8QuantLinear", "NVFP4": "NVFP4QuantLinear",
                 "FP8_STATIC": "WeightFP8ActFP8StaticQuantLinear"}
PROMPT = [[1, 872, 325, 261, 1271, 279, 1647, 12, 331, 325, 261, 4418, 279, 1647, 12]]

INTEL = r'''
import json, sys
from pathlib import Path
import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

args = json.loads(sys.argv[1])
texts = [t for t in Path(args["calib"]).read_text().split("\n\n") if len(t) > 200][:16]
tok = AutoTokenizer.from_pretrained(args["model"])
out = {}
for name in args["schemes"]:
    ar = AutoRound(args["model"], tokenizer=tok, scheme=name, iters=0, disable_opt_rtn=True, disable_model_free=True,
                   dataset=texts, nsamples=4, seqlen=32, batch_size=2, device_map="cpu", seed=0)
    ar.quantize_and_save(str(Path(args["out"]) / name), format="auto_round")
prompt = torch.tensor(args["prompt"])
for path in args["load"]:
    path = next(p.parent for p in Path(path).rglob("config.json"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    with torch.no_grad():
        out[str(path)] = {"logits": model(prompt).logits.float(),
                          "modules": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight_scale")})}
torch.save(out, args["result"])
'''


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("intel_fp")
    tiny = build_tiny_llama(root / "llama", hidden=128, intermediate=256)
    ours = {}
    for name in SCHEMES:
        out = root / "ours" / name
        assert main([str(tiny), "--scheme", name, "--format", "auto_round", "--iters", "0", "--nsamples", "4", "--seqlen", "32",
                     "--batch_size", "2", "--dataset", str(CALIB), "--output_dir", str(out), "--quiet"]) == 0
        ours[name] = out
    intel_out = root / "intel"
    args = {"model": str(tiny), "calib": str(CALIB), "schemes": SCHEMES, "out": str(intel_out), "prompt": PROMPT,
            "load": [str(p) for p in ours.values()] + [str(intel_out / n) for n in SCHEMES], "result": str(root / "intel.pt")}
    env = {**os.environ, "QUANTIZE_LLM_NO_AUTOLOAD": "1"}
    # cwd outside the repository: there a `quantize` on sys.path (cwd) would be imported and take over the loader
    done = subprocess.run([sys.executable, "-c", INTEL, json.dumps(args)], env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    intel = {name: next(p.parent for p in (intel_out / name).rglob("config.json")) for name in SCHEMES}
    return ours, intel, torch.load(root / "intel.pt")


def _ours(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits.float()


def _close(a, b, rtol) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


@pytest.mark.parametrize("name", SCHEMES)
def test_intel_loads_ours(name, both):
    ours, _, intel = both
    got = intel[str(ours[name])]
    assert got["modules"] == [INTEL_MODULES[name]]  # Intel's own FP module (not ours, not a fallback)
    assert _close(got["logits"], _ours(ours[name]), RTOL[name])


@pytest.mark.parametrize("name", SCHEMES)
def test_ours_loads_intels(name, both):
    _, paths, intel = both
    cfg = json.loads((paths[name] / "config.json").read_text())["quantization_config"]
    assert cfg["packing_format"] in ("auto_round:llm_compressor", "auto_round:fp8_static")
    assert _close(_ours(paths[name]), intel[str(paths[name])]["logits"], RTOL[name])


@pytest.mark.parametrize("name", SCHEMES)
def test_our_layout_is_intels(name, both):
    """Same format-defining config fields and the same tensor names and shapes (dtypes may differ: Intel keeps
    FP8_STATIC's scales in bfloat16, we keep the float32 the model was tuned with)."""
    from safetensors import safe_open

    ours, paths, _ = both
    keys = ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type", "act_bits", "act_data_type",
            "act_group_size", "act_dynamic")
    a, b = (json.loads((p / "config.json").read_text())["quantization_config"] for p in (ours[name], paths[name]))
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}

    def shapes(p):
        with safe_open(str(p / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(ours[name]) == shapes(paths[name])
