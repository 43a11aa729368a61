"""On a CUDA GPU: the Triton path loads, generates the same greedy text as the CPU path, and compiles.
Skipped without CUDA (CI); run on the GPU machine."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401
from quantize.calib import calibration_ids
from quantize.export.auto_round import save_auto_round
from quantize.integrations.transformers.modules import QuantLinear
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = torch.tensor([[1, 450, 1183, 310, 278, 3186, 338, 263, 2217, 310, 278]])


@pytest.fixture(scope="module")
def w4_checkpoint(gutenberg, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "w4"
    model, tok = load_model(str(gutenberg))
    blocks = find_blocks(model)
    plan = plan_layers(model, blocks.prefix, Scheme(4, 128, True))
    ids = calibration_ids("bundled", tok, nsamples=16, seqlen=128)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=20, nsamples=16, seqlen=128, batch_size=4), torch.device("cuda"), progress=False)
    save_auto_round(model, tok, result, Scheme(4, 128, True), out)
    return out


def test_gpu_greedy_text_equals_cpu(w4_checkpoint):
    cpu = AutoModelForCausalLM.from_pretrained(w4_checkpoint, dtype=torch.float32)
    # float32 on both sides: the Triton kernels multiply exactly there, so only summation order differs
    gpu = AutoModelForCausalLM.from_pretrained(w4_checkpoint, dtype=torch.float32, device_map="cuda")
    kernels = {m.kernel.name for m in gpu.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"triton"}
    kw = dict(max_new_tokens=24, do_sample=False)
    a = cpu.generate(PROMPT, **kw)[0].tolist()
    b = gpu.generate(PROMPT.cuda(), **kw)[0].tolist()
    print("cpu:", a, "\ngpu:", b)
    assert a == b


def test_device_map_auto_and_compile(w4_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(w4_checkpoint, dtype=torch.bfloat16, device_map="auto")
    with torch.no_grad():
        eager = model(PROMPT.cuda()).logits
        compiled = torch.compile(model)
        again = compiled(PROMPT.cuda()).logits
    # bf16: compilation fuses and reorders the norms and attention, so logits move by a few bf16 ulps
    assert (eager.float() - again.float()).abs().mean() < 0.05
    assert (eager.argmax(-1) == again.argmax(-1)).float().mean() >= 0.9
    assert model.generate(PROMPT.cuda(), max_new_tokens=4, do_sample=False).shape[1] == PROMPT.shape[1] + 4
