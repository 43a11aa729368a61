"""An installed quantize-llm loads auto_round checkpoints in transformers with no ``import quantize``.

quantize-llm.pth (site-packages) imports ``quantize`` at interpreter start, which costs a few stdlib-only
modules; registration waits until transformers imports its quantizer registry (integrations/transformers/
autoload.py). ``QUANTIZE_LLM_NO_AUTOLOAD=1`` turns that off: transformers' own "auto-round" entries stay,
and they load checkpoints through Intel's ``auto_round`` package.

Each script runs in a fresh interpreter, away from the repository (its ``quantize`` folder is not on the
path), and never imports ``quantize`` itself.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantize  # noqa: F401  (this process is the reference: it imports quantize as a user would)
from quantize.calib import calibration_ids
from quantize.checkpoint import layout_for
from quantize.export.auto_round import save_auto_round
from quantize.integrations.transformers.modules import QuantLinear
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

OPT_OUT = "QUANTIZE_LLM_NO_AUTOLOAD"
PROMPT = [[1, 872, 325, 261, 1271, 279, 1647, 12, 331, 325, 261, 4418]]
# Interpreter start may import these of ours (quantize-llm.pth), nothing else of ours or anything heavy.
STARTUP_MODULES = {"quantize", "quantize.integrations", "quantize.integrations.transformers", "quantize.integrations.transformers.autoload"}

# Loads through whatever transformers has registered; reports who registered it and which classes loaded.
LOAD = r'''
import sys
assert "torch" not in sys.modules and "transformers" not in sys.modules
hooked = any(type(f).__name__ == "_RegistryFinder" for f in sys.meta_path)
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor(PROMPT)).logits
torch.save({
    "hooked": hooked,
    "quantizer": auto.AUTO_QUANTIZER_MAPPING["auto-round"].__module__,
    "layers": {type(m).__module__ + "." + type(m).__name__ for m in model.modules() if hasattr(m, "qweight")},
    "logits": logits,
}, sys.argv[2])
'''.replace("PROMPT", repr(PROMPT))


def python(*args, opt_out: bool = False, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter in ``cwd``; opted out only with ``opt_out``, whatever this process's environment says."""
    assert not any("import quantize" in str(a) or "__import__" in str(a) for a in args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop(OPT_OUT, None)
    if opt_out:
        env[OPT_OUT] = "1"
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory) -> Path:
    """W4 g32 sym RTN (auto_round:auto_gptq packing, which Intel's CPU loader reads too)."""
    model, tok = load_model(str(tiny_llama))
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme, None, layout_for=layout_for)
    ids = calibration_ids("bundled", tok, nsamples=4, seqlen=64, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=0, nsamples=4, seqlen=64, batch_size=2), torch.device("cpu"), progress=False)
    return save_auto_round(model, tok, result, scheme, tmp_path_factory.mktemp("autoload") / "w4")


def test_loads_through_ours_without_import(checkpoint, tmp_path):
    python("-c", LOAD, checkpoint, tmp_path / "out.pt", cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert out["hooked"], "the hook was not installed at interpreter start"
    assert out["quantizer"] == "quantize.integrations.transformers.quantizer"
    assert out["layers"] == {f"{QuantLinear.__module__}.QuantLinear"}

    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        assert torch.equal(out["logits"], loaded(torch.tensor(PROMPT)).logits)


def test_opt_out_keeps_transformers_entries(tmp_path):
    script = (
        "import sys; assert 'quantize' not in sys.modules;"
        "from transformers.quantizers import auto;"
        "print(auto.AUTO_QUANTIZER_MAPPING['auto-round'].__module__, auto.AUTO_QUANTIZATION_CONFIG_MAPPING['auto-round'].__module__);"
        "assert not [m for m in sys.modules if m.startswith('quantize')]"
    )
    quantizer, config = python("-c", script, opt_out=True, cwd=tmp_path).stdout.split()
    assert quantizer.startswith("transformers.") and config.startswith("transformers."), (quantizer, config)


def test_opt_out_loads_through_intel(checkpoint, tmp_path):
    pytest.importorskip("auto_round")
    python("-c", LOAD, checkpoint, tmp_path / "out.pt", opt_out=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert not out["hooked"]
    assert out["quantizer"].startswith("transformers.")
    # Intel's auto-round package holds auto_round and auto_round_extension (its CPU modules).
    assert out["layers"] and all(name.startswith("auto_round") for name in out["layers"]), out["layers"]

    # Intel's CPU modules run in float16 (see test_intel_compat.py); the same weights give close logits.
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        ours = loaded(torch.tensor(PROMPT)).logits
    intel = out["logits"].float()
    assert (ours - intel).abs().max() <= 5e-3 * intel.abs().max()


def started_modules(tmp_path, opt_out: bool = False) -> set[str]:
    """What ``python -c pass`` imports, from ``-X importtime``'s report (one line per module)."""
    report = python("-X", "importtime", "-c", "pass", opt_out=opt_out, cwd=tmp_path).stderr
    return {line.split("|")[-1].strip() for line in report.splitlines()}


def test_interpreter_start_stays_cheap(tmp_path):
    imported = started_modules(tmp_path)
    ours = {m for m in imported if m.split(".")[0] == "quantize"}
    assert ours == STARTUP_MODULES, f"{ours}: is quantize-llm.pth in site-packages? (pip install -e .)"
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy", "safetensors", "triton")}
    assert not heavy, heavy

    assert not {m for m in started_modules(tmp_path, opt_out=True) if m.split(".")[0] == "quantize"}


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install lm-eval)")
def test_lm_eval_hf_model_loads_through_ours(checkpoint, tmp_path):
    context, continuation = "It was the best of times,", " it was the worst of times"
    script = r'''
import sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

lm = HFLM(pretrained=sys.argv[1], device="cpu", batch_size=1)
(logprob, _), = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=tuple(sys.argv[2:]), idx=0)])
print(sorted({type(m).__module__ + "." + type(m).__name__ for m in lm.model.modules() if hasattr(m, "qweight")}), logprob)
'''
    layers, logprob = python("-c", script, checkpoint, context, continuation, cwd=tmp_path).stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert layers == f"['{QuantLinear.__module__}.QuantLinear']"

    # The same sum in this process, as lm-eval splits the tokens; it sums in the checkpoint's bfloat16.
    tok = AutoTokenizer.from_pretrained(checkpoint)
    whole, ctx = (tok(t, add_special_tokens=False).input_ids for t in (context + continuation, context))
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(checkpoint)(torch.tensor([whole[:-1]])).logits[0, -len(cont):]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
    assert float(logprob) == pytest.approx(expected, rel=1e-2)


def test_startup_file_is_silent_where_quantize_is_gone(tmp_path):
    """A site folder holding quantize-llm.pth but no importable quantize (a stale editable install, a
    half-removed package): interpreter start stays silent instead of printing a traceback."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "quantize-llm.pth").write_text((Path(__file__).parents[1] / "quantize-llm.pth").read_text())
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import site; site.addsitedir({str(site)!r}); import sys; print('quantize' in sys.modules)"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert run.returncode == 0 and run.stderr == "" and run.stdout.strip() == "False", run
