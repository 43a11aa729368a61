"""On a CUDA GPU: the default path (tinygemm for 4-bit bf16 small-M calls, Triton for the rest) loads,
generates the same greedy text as the CPU path, and compiles; torch's tinygemm op against the reference.
Skipped without CUDA (CI); run on the GPU machine."""

import dataclasses
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401
from quantize.calib import calibration_ids
from quantize.export.auto_round import save_auto_round
from quantize.integrations.transformers.modules import QuantLinear
from quantize.kernels import KERNELS, LinearSpec, select_kernel, tinygemm
from quantize.kernels.tinygemm import U, TinygemmKernel, int4_mm
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.numerics import dequantize
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

from conftest import random_4bit_layer

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
    # tinygemm is picked; float32 activations go through its fallback, the Triton kernels
    assert kernels == {"tinygemm"}
    kw = dict(max_new_tokens=24, do_sample=False)
    a = cpu.generate(PROMPT, **kw)[0].tolist()
    b = gpu.generate(PROMPT.cuda(), **kw)[0].tolist()
    print("cpu:", a, "\ngpu:", b)
    assert a == b


def test_device_map_auto_and_compile(w4_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(w4_checkpoint, dtype=torch.bfloat16, device_map="auto")
    # humming-kernels outranks tinygemm where it is installed (quantize/kernels/humming.py)
    humming = KERNELS["humming"].unsupported(LinearSpec(4, 128, True, "gptq", 512, 512, torch.bfloat16), torch.device("cuda"))
    assert {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)} == {"tinygemm" if humming else "humming"}
    with torch.no_grad():
        eager = model(PROMPT.cuda()).logits
        compiled = torch.compile(model)
        again = compiled(PROMPT.cuda()).logits
    # bf16: compilation fuses and reorders the norms and attention, so logits move by a few bf16 ulps
    assert (eager.float() - again.float()).abs().mean() < 0.05
    assert (eager.argmax(-1) == again.argmax(-1)).float().mean() >= 0.9
    assert model.generate(PROMPT.cuda(), max_new_tokens=4, do_sample=False).shape[1] == PROMPT.shape[1] + 4


def _layer(group_size, sym, layout, n, k, seed=0, kernel=TinygemmKernel, dtype=None):
    """A random 4-bit layer on the GPU, prepared for ``kernel`` (activations of ``dtype`` where it matters)."""
    spec, p, (q, s, z) = random_4bit_layer(group_size, sym, layout, n, k, seed)
    spec = dataclasses.replace(spec, act_dtype=dtype)
    state = {"qweight": p.qweight.cuda(), "qzeros": p.qzeros.cuda(), "scales": p.scales.cuda()}
    state.update(kernel.prepare(spec, state["qweight"], state["qzeros"], state["scales"]))
    return spec, state, (q, s, z)


def test_dispatch_picks_tinygemm_for_4bit():
    cuda = torch.device("cuda")
    assert select_kernel(LinearSpec(4, 128, True, "gptq", 4096, 4096), cuda).name == "tinygemm"
    assert select_kernel(LinearSpec(4, 32, False, "awq", 4096, 4096), cuda).name == "tinygemm"
    assert select_kernel(LinearSpec(2, 128, True, "gptq", 4096, 4096), cuda).name == "triton"
    assert select_kernel(LinearSpec(4, -1, True, "gptq", 4096, 4096), cuda).name == "triton"


@pytest.mark.parametrize("sym, layout", [(True, "gptq"), (False, "auto_round"), (False, "awq")])
@pytest.mark.parametrize("group_size, n, k", [
    (g, n, k) for g in (32, 64, 128, 256) for n, k in ((520, 1024), (264, 768), (72, 1056))  # K 768: 8 inner k-tiles; 1056: 2
    if k % g == 0
])
def test_tinygemm_cuda_per_weight_bound_and_products(sym, layout, group_size, n, k):
    # Stated tolerance (kernels/tinygemm.py): |w_tg - w| <= 3 u |s| (|q-8| + |8-z|), u = 2**-8, per weight;
    # products within 1e-2 relative (Frobenius) of the float32 reference.
    spec, state, (q, s, z) = _layer(group_size, sym, layout, n, k)
    w = dequantize(q, s, z).cuda().double()
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    w_tg = int4_mm(eye, state["tg_weight"], group_size, state["tg_sz"]).double().t()
    sg = s.cuda().double().repeat_interleave(group_size, 1)
    zg = z.cuda().double().repeat_interleave(group_size, 1)
    bound = 3 * U * sg.abs() * ((q.cuda().double() - 8).abs() + (8 - zg).abs())
    assert torch.all((w_tg - w).abs() <= bound + 1e-12)
    for m in (1, 7, 16, 33, tinygemm.MAX_M, tinygemm.MAX_M + 1, 200):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y = TinygemmKernel.apply(spec, state, x, None)
        ref = x.double() @ w.t()
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-2, m


def test_tinygemm_float_activations_and_bias_go_through_fallback():
    spec, state, (q, s, z) = _layer(128, False, "auto_round", 256, 512)
    w = dequantize(q, s, z).cuda()
    bias = torch.randn(256, device="cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, 512, device="cuda").to(dtype)
        y = TinygemmKernel.apply(spec, state, x, bias.to(dtype))
        ref = x.float() @ w.t() + bias.to(dtype).float()
        assert y.dtype == dtype and y.shape == (2, 3, 256)
        assert ((y.float() - ref).norm() / ref.norm()) < 1e-2, dtype


def test_tinygemm_cuda_graph_replay():
    spec, state, _ = _layer(128, True, "gptq", 1024, 2048)
    for m in (1, 16, tinygemm.MAX_M + 1):
        x = torch.randn(m, 2048, dtype=torch.bfloat16, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            TinygemmKernel.apply(spec, state, x, None)  # warm up (Triton compiles outside the capture)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = TinygemmKernel.apply(spec, state, x, None)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, TinygemmKernel.apply(spec, state, x, None)), m


def test_tinygemm_compiled_once_for_every_m():
    # As vLLM compiles: one trace with a symbolic M, then both sides of MAX_M with no recompile.
    spec, state, (q, s, z) = _layer(128, True, "gptq", 1024, 2048)
    w = dequantize(q, s, z).cuda()
    fn = torch.compile(lambda x: TinygemmKernel.apply(spec, state, x, None), dynamic=True)
    torch._dynamo.reset()
    for i, m in enumerate((3, tinygemm.MAX_M + 7, 2, 200)):  # (M = 1 is specialised by dynamo, as in vLLM)
        x = torch.randn(m, 2048, dtype=torch.bfloat16, device="cuda")
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            y = fn(x)
        ref = x.float() @ w.t()
        assert ((y.float() - ref).norm() / ref.norm()) < 1e-2, m


@pytest.fixture(scope="module")
def fp8_static_checkpoint(gutenberg, tmp_path_factory):
    from quantize.export.registry import FormatSpec, export
    from quantize.export.source import ExportSource
    from quantize.scheme import get_scheme

    out = tmp_path_factory.mktemp("cuda") / "fp8"
    model, tok = load_model(str(gutenberg))
    blocks, scheme = find_blocks(model), get_scheme("FP8_STATIC")
    ids = calibration_ids("bundled", tok, nsamples=16, seqlen=128)
    result = quantize_model(model, blocks, plan_layers(model, blocks.prefix, scheme), ids,
                            TuneConfig(iters=0, nsamples=16, seqlen=128, batch_size=4), torch.device("cuda"), progress=False)
    (folder,) = export(ExportSource.from_run(model, tok, result, scheme), [FormatSpec("auto_round")], out)
    return folder


def test_fp8_static_runs_on_fp8_tensor_cores(fp8_static_checkpoint, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    from quantize.integrations.transformers.fp_modules import FPQuantLinear

    forced = tmp_path / "emulated"
    shutil.copytree(fp8_static_checkpoint, forced)
    cfg = json.loads((forced / "config.json").read_text())
    cfg["quantization_config"]["kernel"] = "fp_emulate"
    (forced / "config.json").write_text(json.dumps(cfg))
    native = AutoModelForCausalLM.from_pretrained(fp8_static_checkpoint, dtype=torch.bfloat16, device_map="cuda")
    emulated = AutoModelForCausalLM.from_pretrained(forced, dtype=torch.bfloat16, device_map="cuda")
    exact = AutoModelForCausalLM.from_pretrained(forced, dtype=torch.float32, device_map="cuda")
    layers = [m for m in native.modules() if isinstance(m, FPQuantLinear)]
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores on this GPU: the emulation serves FP8_STATIC")
    expected = "vllm_fp8" if "vllm._custom_ops" in sys.modules else "fp8_scaled_mm"  # vLLM's, where it is loaded
    assert {m.kernel.name for m in layers} == {expected}, [m.kernel.name for m in layers]
    assert all(m.k_weight.dtype == torch.float8_e4m3fn for m in layers)  # no 16-bit copy of the weight
    assert {m.kernel.name for m in emulated.modules() if isinstance(m, FPQuantLinear)} == {"fp_emulate"}
    ids = calibration_ids("bundled", AutoTokenizer.from_pretrained(fp8_static_checkpoint), nsamples=4, seqlen=128).cuda()
    with torch.no_grad():
        ref = exact(ids).logits.float().log_softmax(-1)
        dist = {}
        for name, model in (("native", native), ("emulated", emulated), ("compiled", torch.compile(native))):
            lp = model(ids).logits.float().log_softmax(-1)
            dist[name] = ((lp - ref).abs().mean().item(), (lp.argmax(-1) == ref.argmax(-1)).float().mean().item())
    print("mean |log-prob diff| from the float32 model, top-1 agreement:", dist)
    # Both bf16 paths sit far from float32 on this model (one bf16 rounding flips an activation's FP8 code,
    # ~0.24 mean on the CPU for both); the kernel rounds less than the emulation, so it is no further away
    for name in ("native", "compiled"):
        assert dist[name][0] <= dist["emulated"][0] * 1.1 and dist[name][1] >= dist["emulated"][1] - 0.03, dist
    assert native.generate(ids[:1, :16], max_new_tokens=4, do_sample=False).shape[1] == 20


def test_vllm_fp8_kernel_agrees_with_the_scaled_mm_kernel():
    vllm_ops = pytest.importorskip("vllm._custom_ops")
    from quantize import numerics_act, numerics_fp8
    from quantize.kernels import FPLinearSpec
    from quantize.kernels.fp8_scaled_mm import FP8ScaledMMKernel
    from quantize.kernels.vllm_fp8 import VllmFP8Kernel
    from quantize.scheme import get_scheme

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores on this GPU")
    dev = torch.device("cuda")
    spec = FPLinearSpec(get_scheme("FP8_STATIC"), 4096, 1024, torch.bfloat16)
    assert select_kernel(spec, dev).name == "vllm_fp8"
    g = torch.Generator(device=dev).manual_seed(0)
    weight, weight_scale = numerics_fp8.quantize_weight(torch.randn(1024, 4096, device=dev, generator=g) * 0.02, "channel")
    parts = [{"weight": weight, "weight_scale": weight_scale, "input_scale": numerics_act.fp8_static_scale(4.0).to(dev)}]
    state = VllmFP8Kernel.prepare(spec, parts)
    bias = torch.randn(1024, device=dev, generator=g).to(torch.bfloat16)
    for m in (1, 16, 300):
        x = (torch.randn(m, 4096, device=dev, generator=g) * 1.5).to(torch.bfloat16)
        q, _ = vllm_ops.scaled_fp8_quant(x, state["input_scale"].reshape(1))
        differ = (q.float() != numerics_fp8.codes(x, state["input_scale"]).float()).float().mean().item()
        a = VllmFP8Kernel.apply(spec, state, x, bias).float()
        b = FP8ScaledMMKernel.apply(spec, state, x, bias).float()
        rel = ((a - b).norm() / b.norm()).item()
        print(f"M={m}: codes differing from the scheme's rule {differ:.2e}, relative difference {rel:.2e}")
        assert differ <= 1e-3 and rel < 5e-3


def _fp_parts(scheme, rows, k, dev, shared):
    """One fused layer's auto_round FP tensors (q/k/v-like parts of ``rows``), from random weights; NVFP4
    parts share one global scale (``shared``, as we and AutoRound write them) or keep their own."""
    from quantize import numerics_nvfp4
    from quantize.export.auto_round_fp import layer_tensors
    from quantize.signround import QuantizedWeight
    from quantize.weight_rules import quantize_weight

    g = torch.Generator(device=dev).manual_seed(0)
    weights = [torch.randn(n, k, device=dev, generator=g) * 0.02 * (i + 1) for i, n in enumerate(rows)]
    parts = []
    for w in weights:
        ctx = {}
        if scheme.data_type == "nv_fp":
            ctx["global_scale"] = numerics_nvfp4.fused_global_scale([x.abs().amax() for x in weights] if shared else [w.abs().amax()]).to(dev)
        q, scales, zeros, extra = quantize_weight(w, scheme, ctx=ctx)
        if scheme.quantizes_activations and scheme.data_type == "nv_fp":
            extra["input_global_scale"] = numerics_nvfp4.global_scale(8.0).to(dev)
        parts.append(layer_tensors(QuantizedWeight(q, scales, zeros, scheme, extra)))
    return parts


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_vllm_own_marlin_fp4_runs_in_this_process(kind):
    # The control for the test below (whose first H200 run faulted): vLLM's own random FP4 layer through
    # the same two functions, no tensor of ours involved.
    pytest.importorskip("vllm._custom_ops")
    from vllm.model_executor.layers.quantization.utils import marlin_utils, marlin_utils_fp4

    dev = torch.device("cuda")
    w = torch.randn(1536, 2048, device=dev, dtype=torch.bfloat16)
    if kind == "nvfp4":
        ref, qweight, scales, global_scale = marlin_utils_fp4.rand_marlin_weight_nvfp4_like(w, 16)
    else:
        (ref, qweight, scales), global_scale = marlin_utils_fp4.rand_marlin_weight_mxfp4_like(w, 32), None
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    out = marlin_utils_fp4.apply_fp4_marlin_linear(input=x, weight=qweight, weight_scale=scales, weight_global_scale=global_scale,
                                                   workspace=marlin_utils.marlin_make_workspace_new(dev), size_n=1536, size_k=2048)
    want = x.float() @ ref.float()
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16", "MXFP8A16", "NVFP4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_vllm_marlin_fp_agrees_with_the_dequantized_weight(name, dtype, shared):
    pytest.importorskip("vllm._custom_ops")
    import torch.nn.functional as F

    from quantize.kernels import FPLinearSpec
    from quantize.kernels.fp_emulate import FPEmulateKernel
    from quantize.kernels.vllm_marlin_fp import VllmMarlinFPKernel
    from quantize.scheme import get_scheme

    dev, scheme, rows, k = torch.device("cuda"), get_scheme(name), [1024, 256, 256], 2048
    if not shared and scheme.data_type != "nv_fp":
        pytest.skip("only NVFP4 parts carry a global scale")
    spec = FPLinearSpec(scheme, k, sum(rows), dtype)
    assert select_kernel(spec, dev, force="vllm_marlin_fp").name == "vllm_marlin_fp"
    parts = _fp_parts(scheme, rows, k, dev, shared)
    state = VllmMarlinFPKernel.prepare(spec, parts)
    assert ("column_scale" in state) == (not shared)
    weight = FPEmulateKernel.prepare(spec, parts)["weight"]  # exact dequantization, rounded once to dtype
    g = torch.Generator(device=dev).manual_seed(1)
    bias = torch.randn(sum(rows), device=dev, generator=g).to(dtype)
    for m in (1, 16, 300):
        x = torch.randn(m, k, device=dev, generator=g).to(dtype)
        got = VllmMarlinFPKernel.apply(spec, state, x, bias).float()
        want = F.linear(x.float(), weight.float(), bias.float())
        rel = ((got - want).norm() / want.norm()).item()
        print(f"{name} {dtype} shared={shared} M={m}: relative difference {rel:.2e}")
        assert rel < 1e-2, rel
    # inside a CUDA graph, as vLLM captures decode
    x = torch.randn(4, k, device=dev, generator=g).to(dtype)
    eager = VllmMarlinFPKernel.apply(spec, state, x, bias)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = VllmMarlinFPKernel.apply(spec, state, x, bias)
    graph.replay()
    # Marlin may reduce split-K partial sums with atomics for some shapes: the same sums in another order
    assert ((captured.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-3


@pytest.mark.parametrize("sym, layout", [(True, "gptq"), (False, "auto_round"), (False, "awq")])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gemv_rounds_the_exact_product_once(sym, layout, group_size, dtype):
    from quantize.kernels import cuda_gemv
    from quantize.kernels.cuda_gemv import CudaGemvKernel

    n, k = 1030, 2048  # N not a multiple of the rows a block owns
    spec, state, (q, s, z) = _layer(group_size, sym, layout, n, k, kernel=CudaGemvKernel, dtype=dtype)
    assert CudaGemvKernel.unsupported(spec, torch.device("cuda")) is None
    w = dequantize(q, s, z).cuda().double()
    bias = torch.randn(n, device="cuda").to(dtype)
    for m in (1, 2, 3, 4, cuda_gemv.MAX_M + 1, 40):
        x = torch.randn(m, k, device="cuda").to(dtype)
        if m == 3:  # contiguous but 6 bytes past an alignment boundary (a view into a larger buffer)
            x = torch.cat([torch.zeros(3, device="cuda", dtype=dtype), x.flatten()])[3:].view(m, k)
        y = CudaGemvKernel.apply(spec, state, x, bias if m == 2 else None)
        ref = x.double() @ w.t() + (bias.double() if m == 2 else 0)
        assert y.shape == (m, n) and y.dtype == dtype
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        if m <= cuda_gemv.MAX_M:
            # float32 sums, one rounding to the output dtype: no further from the exact product than that rounding
            floor = ((ref.to(dtype).double() - ref).norm() / ref.norm()).item()
            assert rel <= floor * 1.05 + 1e-5, (m, rel, floor)
        else:
            assert rel < 1e-2, (m, rel)


def test_cuda_gemv_cuda_graph_and_3d_input():
    from quantize.kernels.cuda_gemv import CudaGemvKernel

    spec, state, _ = _layer(128, True, "gptq", 4096, 4096, kernel=CudaGemvKernel, dtype=torch.bfloat16)
    x = torch.randn(1, 2, 4096, device="cuda", dtype=torch.bfloat16)
    eager = CudaGemvKernel.apply(spec, state, x, None)
    assert eager.shape == (1, 2, 4096)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        CudaGemvKernel.apply(spec, state, x, None)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = CudaGemvKernel.apply(spec, state, x, None)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)  # no atomics: the same sums in the same order


def test_cuda_gemv_compiled_once_for_every_m():
    from quantize.kernels.cuda_gemv import CudaGemvKernel

    spec, state, (q, s, z) = _layer(128, False, "auto_round", 512, 1024, kernel=CudaGemvKernel, dtype=torch.bfloat16)
    w = dequantize(q, s, z).cuda().float()
    f = torch.compile(lambda x: CudaGemvKernel.apply(spec, state, x, None), dynamic=True, fullgraph=True)
    for m in (2, 3, 9, 40):  # both sides of MAX_M through one trace
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.t()
        assert ((f(x).float() - ref).norm() / ref.norm()) < 1e-2, m
