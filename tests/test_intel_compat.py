"""Checkpoint compatibility with Intel AutoRound (``auto-round==0.16.1``), in both directions.

On a tiny random Llama (hidden 128, intermediate 256, 2 layers: every dimension a multiple of 32):

- Intel -> us: Intel's ``AutoRound`` (RTN: ``iters=0``) writes an auto_round checkpoint of each format;
  this project's loader must give the same dequantized weights and logits as Intel's own inference code.
- us -> Intel: this project (SignRound, 10 iterations) writes a checkpoint of each format; Intel's loader
  must reproduce our in-memory quantized model, and our checkpoint must have the layout of Intel's own
  (same format-defining ``quantization_config`` fields, same tensor names, dtypes and shapes).

Intel's code runs in subprocesses that never import ``quantize`` and set ``QUANTIZE_LLM_NO_AUTOLOAD=1``: an
installed quantize-llm, like ``import quantize``, replaces transformers' "auto-round" registry entries (which call
into Intel's package) with ours. They write what they computed with ``torch.save``; this process compares.

What "the same" means:

- Weights: each quantized layer's weight matrix, as the module multiplies by it (its forward applied to the
  float32 identity), on both sides. Intel's CPU modules dequantize in float16 (``scales`` is float16 and
  ``scales * (q - zero)`` stays float16); our kernel dequantizes in float32. They must be identical after
  rounding ours to float16: bit-exact up to that one rounding, so any wrong code, zero point, scale, bit
  width or layout shows. The set of quantized layers (and their bit widths) must match too.
- Logits: Intel's loader forces the model to float16 on the CPU (its torch kernels do not list float32);
  ours run in float32. So ``max |ours - intel| <= LOGIT_RTOL * max |intel|``.
- Our RTN checkpoint's packed tensors equal Intel's RTN checkpoint's, byte for byte, when both compute in
  float32. Intel's CPU path picks its compute dtype by the processor: where the CPU reports AVX512_BF16
  (CPUID leaf 7.1, ``auto_round.utils.device.CpuInfo``) its default ``amp=True`` casts the model to
  bfloat16 and computes each group's range ``(max - min) / maxq`` in bfloat16 before the float16 scale;
  elsewhere it computes in float32. So the byte-for-byte comparison runs Intel with ``amp=False`` (float32
  on every CPU), and a second one runs Intel's default: on a bf16 CPU its asymmetric scales differ from
  ours by bfloat16 rounding (relative 2^-8 of the range) and its zero points and codes follow, so the
  stated tolerance there is on the dequantized weights: within one quantization step of ours. (Symmetric
  scales divide by a power of two, exact in bfloat16: those stay byte-identical either way.)

Intel's loader cannot load ``auto_round:auto_awq`` (4-bit asym) on a CPU without ``auto-round-lib``,
``gptqmodel`` or ``autoawq``: backend selection (auto_round/inference/backend.py) falls back to
``auto_round:fake``, whose ``FakeActQuantLinear`` is meant for checkpoints that store float weights: it
keeps a ``weight`` the checkpoint does not have (transformers initialises it randomly), ignores
``qweight/qzeros/scales``, and its forward raises ``TypeError: unsupported operand type(s) for +:
'NoneType' and 'str'`` in ``get_quant_func`` (it fake-quantizes activations with ``act_data_type=None``).
For that format the reference is Intel's own AWQ module,
``auto_round.export.export_to_awq.utils.WQLinear_GEMM`` (the class Intel's exporter packs into; its forward
unpacks with Intel's ``dequantize_gemm``), put in place of each quantized ``nn.Linear`` with the
checkpoint's tensors loaded strictly. Where Intel's loader does load the format, the loader is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("auto_round")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import quantize  # noqa: E402,F401  (registers our transformers loader)
from quantize.calib import bundled_path, calibration_ids  # noqa: E402
from quantize.checkpoint import PACKING_FORMATS, layout_for  # noqa: E402
from quantize.export.auto_round import packed_state_dict, save_auto_round  # noqa: E402
from quantize.integrations.transformers.modules import QuantLinear  # noqa: E402
from quantize.layer_config import plan_layers  # noqa: E402
from quantize.model import find_blocks, load_model  # noqa: E402
from quantize.numerics import dequantize  # noqa: E402
from quantize.packing import PackedLinear, unpack  # noqa: E402
from quantize.presets import TuneConfig  # noqa: E402
from quantize.quantizer import quantize_model  # noqa: E402
from quantize.scheme import Scheme  # noqa: E402

from conftest import build_tiny_llama  # noqa: E402

LOGIT_RTOL = 5e-3  # observed <= 8.3e-4 (Intel computes in float16); the weights are compared exactly
OUR_ITERS = 10
# "It was the best of times, it was the worst of times, it was the age of wisdom" in the tiny model's tokenizer
PROMPT = [[1, 872, 325, 261, 1271, 279, 1647, 12, 331, 325, 261, 4418, 279, 1647, 12, 331, 325, 261, 2169, 279, 4377]]
MIXED = {"model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.q_proj": {"bits": 16}}


@dataclass(frozen=True)
class Format:
    scheme: Scheme
    packing: str  # the packing_format both tools must pick
    layer_config: dict | None = None


FORMATS = {
    "W4G32-sym": Format(Scheme(4, 32, True), "auto_round:auto_gptq"),
    "W4G32-asym": Format(Scheme(4, 32, False), "auto_round:auto_awq"),
    "W3G32-asym": Format(Scheme(3, 32, False), "auto_round"),
    "W2G32-sym-mixed": Format(Scheme(2, 32, True), "auto_round:auto_gptq", MIXED),
    "W8-per-channel-sym": Format(Scheme(8, -1, True), "auto_round:auto_gptq"),
}
# quantization_config fields that define the checkpoint (the others are tuning notes).
FORMAT_KEYS = ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type", "block_name_to_quantize", "extra_config")
PACKED = ("qweight", "qzeros", "scales")
ASYM = [name for name, f in FORMATS.items() if not f.scheme.sym]
AMP = "@amp"  # suffix of the checkpoints Intel wrote with its default amp=True

# --- Intel's side: scripts run with a fresh interpreter that never imports `quantize` ---------------------

INTEL_QUANTIZE = r'''
import json, sys
from pathlib import Path
from auto_round import AutoRound
from transformers import AutoTokenizer

args = json.loads(sys.argv[1])
texts = [t for t in Path(args["calib"]).read_text().split("\n\n") if len(t) > 200][:16]
tok = AutoTokenizer.from_pretrained(args["model"])
for name, f in args["formats"].items():
    # RTN through the regular (model-loading) flow: disable_opt_rtn skips the slow scale search, and
    # disable_model_free keeps it off the shard-by-shard route (another code path, with a process pool).
    ar = AutoRound(args["model"], tokenizer=tok, bits=f["bits"], group_size=f["group_size"], sym=f["sym"],
                   layer_config=f["layer_config"], iters=0, disable_opt_rtn=True, disable_model_free=True, amp=f["amp"],
                   dataset=texts, nsamples=4, seqlen=32, batch_size=2, device_map="cpu", seed=0)
    ar.quantize_and_save(str(Path(args["out"]) / name), format="auto_round")
assert "quantize" not in sys.modules
'''

INTEL_REFERENCE = r'''
import json, sys, traceback
from pathlib import Path
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

args = json.loads(sys.argv[1])
prompt = torch.tensor(args["prompt"])


def run(model):
    """Logits, and every quantized layer's dequantized weight [N, K] as Intel's module computes it (its
    forward applied to the identity in float32: exactly the weight matrix it multiplies by)."""
    with torch.no_grad():
        logits = model(prompt).logits
        weights, modules, bits = {}, {}, {}
        for name, m in model.named_modules():
            if hasattr(m, "qweight"):
                k = getattr(m, "in_features", None) or m.infeatures
                weights[name] = m(torch.eye(k, dtype=torch.float32)).float().t().contiguous()
                modules[name] = f"{type(m).__module__}.{type(m).__name__}"
                bits[name] = getattr(m, "bits", None) or m.w_bit
    return {"logits": logits.float(), "logits_dtype": str(logits.dtype), "weights": weights, "modules": modules, "bits": bits}


def intel_loader(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fake = [n for n, m in model.named_modules() if type(m).__name__ == "FakeActQuantLinear"]
    if fake:  # computes with float weights the checkpoint does not have, ignoring the packed tensors
        try:
            model(prompt)
            why = "its forward runs on random weights"
        except Exception as e:
            why = f"its forward raises {type(e).__name__}: {e}"
        raise RuntimeError(f"Intel's loader put FakeActQuantLinear in {len(fake)} layers; {why}")
    return run(model)


def awq_modules(path):
    """Intel's own AWQ module (the class its exporter packs auto_round:auto_awq into) in place of each
    quantized nn.Linear, the checkpoint loaded strictly: the reference where Intel's loader cannot load."""
    from auto_round.export.export_to_awq.utils import WQLinear_GEMM

    config = AutoConfig.from_pretrained(path)
    qcfg = config.quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and f"{name}.qweight" in state:
            spec = {**qcfg, **qcfg.get("extra_config", {}).get(name, {})}
            ql = WQLinear_GEMM(spec["bits"], spec["group_size"], m.in_features, m.out_features, m.bias is not None, "cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ql)
    model.load_state_dict(state, strict=True)
    return run(model.eval())


for job in args["jobs"]:
    path = job["path"]
    packing = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["packing_format"]
    out = {"loader_error": None}
    try:
        out.update(intel_loader(path), reference="intel loader")
    except Exception as e:
        out["loader_error"] = "".join(traceback.format_exception_only(e)).strip()
        if packing == "auto_round:auto_awq":
            out.update(awq_modules(path), reference="intel WQLinear_GEMM")
    torch.save(out, job["out"])
assert "quantize" not in sys.modules
'''


def run_intel(script: str, args: dict, cwd: Path) -> None:
    # Everything it needs is local; and an installed quantize-llm must not take over transformers' "auto-round".
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "QUANTIZE_LLM_NO_AUTOLOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"Intel subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


# --- fixtures: every checkpoint is built once ------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("intel_compat")


@pytest.fixture(scope="module")
def tiny(work) -> Path:
    return build_tiny_llama(work / "tiny", hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="module")
def intel_checkpoints(tiny, work) -> dict[str, Path]:
    """Checkpoints Intel wrote; it puts each in a subfolder named after the model and scheme."""
    out = work / "intel"
    formats = {
        name + suffix: {"bits": f.scheme.bits, "group_size": f.scheme.group_size, "sym": f.scheme.sym,
                        "layer_config": f.layer_config, "amp": amp}
        for name, f in FORMATS.items()
        for suffix, amp in [("", False)] + ([(AMP, True)] if name in ASYM else [])
    }
    run_intel(INTEL_QUANTIZE, {"model": str(tiny), "out": str(out), "calib": str(bundled_path("calib.txt")), "formats": formats}, work)
    found = {}
    for name in formats:
        configs = list((out / name).glob("*/config.json"))
        assert len(configs) == 1, f"expected one checkpoint folder under {out / name}, found {configs}"
        found[name] = configs[0].parent
    return found


def quantize_ours(tiny: Path, fmt: str, iters: int):
    """This project's quantization of the tiny model; float32, so the in-memory model holds the exact
    dequantized weights."""
    f = FORMATS[fmt]
    model, tok = load_model(str(tiny), dtype=torch.float32)
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, f.scheme, f.layer_config, layout_for=layout_for)
    ids = calibration_ids("bundled", tok, nsamples=4, seqlen=32, seed=0)
    tune = TuneConfig(iters=iters, nsamples=4, seqlen=32, batch_size=2)
    return model, tok, quantize_model(model, blocks, plan, ids, tune, torch.device("cpu"), progress=False)


@dataclass
class Ours:
    path: Path
    logits: torch.Tensor  # the in-memory quantized model's
    weights: dict[str, torch.Tensor]  # its quantized layers' weights (what the checkpoint must give back)


@pytest.fixture(scope="module")
def our_checkpoints(tiny, work) -> dict[str, Ours]:
    """Tuned with SignRound (OUR_ITERS), so that most codes, scales and zero points differ from Intel's RTN
    checkpoint of the same format (RTN alone gives Intel's bytes exactly: test_our_rtn_is_intels_rtn)."""
    ours = {}
    for name, f in FORMATS.items():
        model, tok, result = quantize_ours(tiny, name, OUR_ITERS)
        path = save_auto_round(model, tok, result, f.scheme, work / "ours" / name)
        with torch.no_grad():
            logits = model(torch.tensor(PROMPT)).logits
        weights = {n: model.get_submodule(n).weight.detach().clone() for n in result.weights}
        ours[name] = Ours(path, logits, weights)
    return ours


@pytest.fixture(scope="module")
def intel_reference(intel_checkpoints, our_checkpoints, work) -> dict[tuple[str, str], dict]:
    """What Intel's inference code computes for every checkpoint: ("intel" | "ours", format) -> results."""
    jobs = {("intel", n): intel_checkpoints[n] for n in FORMATS} | {("ours", n): o.path for n, o in our_checkpoints.items()}
    outs = {key: work / f"ref-{key[0]}-{key[1]}.pt" for key in jobs}
    run_intel(INTEL_REFERENCE, {"prompt": PROMPT, "jobs": [{"path": str(jobs[k]), "out": str(outs[k])} for k in jobs]}, work)
    return {key: torch.load(out) for key, out in outs.items()}


# --- helpers ---------------------------------------------------------------------------------------------


def quantization_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def tensor_specs(path: Path) -> dict[str, tuple[str, tuple]]:
    specs = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                specs[k] = (s.get_dtype(), tuple(s.get_shape()))
    return specs


def check_reference(fmt: str, ref: dict) -> None:
    """Intel's loader is the reference; only auto_awq may fall back to Intel's WQLinear_GEMM (see above)."""
    if ref["loader_error"] is not None and FORMATS[fmt].packing != "auto_round:auto_awq":
        pytest.fail(f"Intel's loader failed on {fmt}: {ref['loader_error']}")
    assert "reference" in ref, f"no Intel reference for {fmt}: {ref['loader_error']}"
    assert not any("Fake" in m for m in ref["modules"].values())


def effective_weight(module: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The weight ``[N, K]`` a linear module multiplies by: its forward applied to the float32 identity
    (exact: every output element is one weight times 1 plus zeros)."""
    with torch.no_grad():
        return module(torch.eye(in_features, dtype=torch.float32)).float().t().contiguous()


def our_loaded_weights(path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Our loader's model (float32) and each QuantLinear's weight as its kernel computes with it. Taken
    through forward rather than the kernel's derived buffers, whose names are the kernel's own business."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = {n: effective_weight(m, m.in_features) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return model, weights


def compare_weights(ours: dict[str, torch.Tensor], intel: dict[str, torch.Tensor]) -> float:
    """Same layers; each weight identical to Intel's after rounding ours to float16. Returns max |ours - intel|."""
    assert set(ours) == set(intel), f"quantized layers differ: ours only {set(ours) - set(intel)}, Intel only {set(intel) - set(ours)}"
    worst = 0.0
    for name, w in ours.items():
        ref = intel[name]
        assert w.shape == ref.shape, f"{name}: shape {tuple(w.shape)} vs Intel's {tuple(ref.shape)}"
        mismatch = (w.to(torch.float16) != ref.to(torch.float16)).sum().item()
        assert mismatch == 0, f"{name}: {mismatch} of {w.numel()} weights differ from Intel's after float16 rounding"
        worst = max(worst, (w.float() - ref.float()).abs().max().item())
    return worst


def compare_logits(ours: torch.Tensor, intel: torch.Tensor) -> tuple[float, float]:
    diff = (ours.float() - intel.float()).abs().max().item()
    scale = intel.float().abs().max().item()
    assert diff <= LOGIT_RTOL * scale, f"logits differ by {diff:.3g} > {LOGIT_RTOL} x max |logit| {scale:.3g}"
    return diff, scale


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_intel_checkpoint_loads_in_ours(fmt, intel_checkpoints, intel_reference):
    path = intel_checkpoints[fmt]
    assert quantization_config(path)["packing_format"] == FORMATS[fmt].packing
    ref = intel_reference[("intel", fmt)]
    check_reference(fmt, ref)

    model, weights = our_loaded_weights(path)
    assert {n: m.spec.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)} == ref["bits"]
    wdiff = compare_weights(weights, ref["weights"])
    with torch.no_grad():
        ldiff, scale = compare_logits(model(torch.tensor(PROMPT)).logits, ref["logits"])
    print(f"\nIntel -> us {fmt}: reference {ref['reference']} ({ref['logits_dtype']}), {len(weights)} layers, "
          f"max weight diff {wdiff:.3g} (0 after fp16 rounding), max logit diff {ldiff:.3g} (max |logit| {scale:.3g})"
          + (f"; Intel's loader: {ref['loader_error'].splitlines()[-1]}" if ref["loader_error"] else ""))


@pytest.mark.parametrize("fmt", FORMATS)
def test_our_checkpoint_loads_in_intel(fmt, our_checkpoints, intel_reference):
    ours = our_checkpoints[fmt]
    assert quantization_config(ours.path)["packing_format"] == FORMATS[fmt].packing
    ref = intel_reference[("ours", fmt)]
    check_reference(fmt, ref)

    wdiff = compare_weights(ours.weights, ref["weights"])
    ldiff, scale = compare_logits(ours.logits, ref["logits"])
    intel_rtn = intel_reference[("intel", fmt)]["weights"]
    tuned = sum((w.half() != intel_rtn[n].half()).sum().item() for n, w in ours.weights.items()) / sum(w.numel() for w in ours.weights.values())
    print(f"\nus -> Intel {fmt}: reference {ref['reference']} ({ref['logits_dtype']}), {len(ours.weights)} layers "
          f"({tuned:.0%} of weights differ from Intel's RTN), max weight diff {wdiff:.3g} (0 after fp16 rounding), "
          f"max logit diff {ldiff:.3g} (max |logit| {scale:.3g})")


@pytest.mark.parametrize("fmt", FORMATS)
def test_our_checkpoint_has_intels_layout(fmt, our_checkpoints, intel_checkpoints):
    ours, intel = our_checkpoints[fmt].path, intel_checkpoints[fmt]
    our_cfg, intel_cfg = quantization_config(ours), quantization_config(intel)
    assert {k: our_cfg.get(k) for k in FORMAT_KEYS} == {k: intel_cfg.get(k) for k in FORMAT_KEYS}
    assert json.loads((ours / "quantization_config.json").read_text()) == our_cfg

    our_tensors, intel_tensors = tensor_specs(ours), tensor_specs(intel)
    assert set(our_tensors) == set(intel_tensors)
    for name, (dtype, shape) in intel_tensors.items():
        if name.rpartition(".")[2] in PACKED:
            assert our_tensors[name] == (dtype, shape), f"{name}: ours {our_tensors[name]}, Intel's {(dtype, shape)}"
        else:  # unquantized tensors keep each tool's model dtype; only the shape is format
            assert our_tensors[name][1] == shape, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_our_rtn_is_intels_rtn(fmt, tiny, intel_checkpoints):
    """Same rounding rules and packing: our RTN (iters=0) packs to exactly the tensors Intel's RTN wrote."""
    model, _, result = quantize_ours(tiny, fmt, iters=0)
    ours = packed_state_dict(model, result, PACKING_FORMATS[FORMATS[fmt].packing])
    intel = {}
    for f in intel_checkpoints[fmt].glob("*.safetensors"):
        intel.update(load_file(f))
    packed = sorted(k for k in intel if k.rpartition(".")[2] in PACKED)
    assert packed and packed == sorted(k for k in ours if k.rpartition(".")[2] in PACKED)
    differ = [k for k in packed if not torch.equal(ours[k], intel[k])]
    assert not differ, f"{len(differ)} of {len(packed)} packed tensors differ from Intel's, e.g. {differ[:3]}"


@pytest.mark.parametrize("fmt", ASYM)
def test_intels_default_cpu_rtn_is_ours_within_bf16_rounding(fmt, tiny, intel_checkpoints):
    """Intel's default (amp=True): float32 on CPUs without AVX512_BF16, so byte-identical there; bfloat16
    range arithmetic where the CPU has it, so scales within bf16 rounding and weights within one step."""
    model, _, result = quantize_ours(tiny, fmt, iters=0)
    layout = PACKING_FORMATS[FORMATS[fmt].packing]
    ours = packed_state_dict(model, result, layout)
    intel = {}
    for f in intel_checkpoints[fmt + AMP].glob("*.safetensors"):
        intel.update(load_file(f))
    if not torch.cpu._is_avx512_bf16_supported():
        assert all(torch.equal(ours[k], intel[k]) for k in intel if k.rpartition(".")[2] in PACKED)
        return
    for name, qw in result.weights.items():
        n, k = qw.q.shape
        theirs = unpack(layout, PackedLinear(*(intel[f"{name}.{t}"] for t in PACKED)), qw.scheme.bits, k, n)
        scale_err = ((theirs[1].float() - qw.scales.float()).abs() / qw.scales.float()).max().item()
        assert scale_err <= 2 ** -7, (name, scale_err)  # bf16 rounding of the range, then float16 rounding
        # A zero point one apart shifts a weight by one step; the scale's own difference adds up to
        # scale_err * |q - z| <= scale_err * maxq steps.
        step = qw.scales.float().repeat_interleave(k // qw.scales.shape[1], dim=1)
        diff = (dequantize(*theirs) - qw.dequantize(torch.float32)).abs()
        bound = 1 + 2 ** -7 * (2 ** qw.scheme.bits - 1)
        assert (diff <= step * bound).all(), (name, (diff / step).max().item(), bound)
