"""The humming-kernels candidate: our checkpoint tensors in humming's standard form (checked on the CPU
against a readable decoding, and against humming's own GPTQ schema where humming is installed), its
refusals, and on a CUDA GPU with humming installed its products against the reference dequantization,
bias and batch dimensions, CUDA-graph replay and torch.compile."""

import pytest
import torch

from quantize.kernels import KERNELS, LinearSpec, select_kernel
from quantize.kernels.humming import HummingKernel, standard_tensors
from quantize.numerics import dequantize, quantize_weight
from quantize.packing import pack, unpack_bits

CASES = [(b, sym, layout) for b in (2, 3, 4, 8) for sym, layout in ((True, "gptq"), (False, "auto_round"))]
CASES += [(4, False, "awq"), (4, True, "awq"), (3, False, "gptq")]


def case(bits, group_size, sym, layout, n=256, k=512, seed=0):
    torch.manual_seed(seed)
    q, scales, zeros = quantize_weight(torch.randn(n, k) * 0.02, bits, group_size, sym)
    spec = LinearSpec(bits, group_size, sym, layout, k, n, torch.bfloat16)
    return spec, pack(layout, q, scales, zeros, bits), dequantize(q, scales, zeros)


def decode_standard(spec: LinearSpec, t: dict) -> torch.Tensor:
    """humming's documented meaning of its standard form: ``(code - zero) * scale``, zero ``2**(b-1)`` when
    the layer has no zero point."""
    n, k, b = spec.out_features, spec.in_features, spec.bits
    q = unpack_bits(t["weight"], b, k).float()
    s = t["weight_scale"].float()
    groups = s.shape[1]
    if "zero_point" in t:
        z = unpack_bits(t["zero_point"].t(), b, n).t().float()
    else:
        z = torch.full((n, groups), 2.0 ** (b - 1))
    per_col = lambda g: g.repeat_interleave(k // groups, dim=1)  # noqa: E731
    return (q - per_col(z)) * per_col(s)


@pytest.mark.parametrize("bits, sym, layout", CASES)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_standard_form_decodes_to_the_checkpoint_weight(bits, sym, layout, group_size):
    spec, packed, w = case(bits, group_size, sym, layout)
    t = standard_tensors(spec, packed)
    assert t["weight"].shape == (256, 512 * bits // 32) and t["weight"].dtype == torch.int32
    assert t["weight_scale"].dtype == torch.bfloat16
    assert ("zero_point" in t) == (not sym)
    # the kernel takes bf16 scales; the codes and zeros decode exactly with the checkpoint's float16 ones
    ref = decode_standard(spec, {**t, "weight_scale": packed.scales.t().float()})
    assert torch.equal(ref, w)


def test_matches_hummings_own_gptq_conversion():
    pytest.importorskip("humming", exc_type=ImportError)
    from humming.schema import BaseWeightSchema

    for bits, sym in ((3, False), (2, True), (4, False), (8, True)):
        spec, packed, _ = case(bits, 128, sym, "auto_round")  # zeros stored as they are, as humming reads them
        schema = BaseWeightSchema.from_config({"quant_method": "gptq", "bits": bits, "group_size": 128, "sym": sym})
        _, theirs = schema.convert_humming({"qweight": packed.qweight, "scales": packed.scales, "qzeros": packed.qzeros},
                                           [256], [512], torch.bfloat16)
        ours = standard_tensors(spec, packed)
        assert set(ours) == set(theirs)
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name


def test_refusals_name_the_reason():
    spec = LinearSpec(3, 128, False, "auto_round", 512, 256, torch.bfloat16)
    assert HummingKernel.unsupported(spec, torch.device("cpu")) == "needs a CUDA device"
    if torch.cuda.is_available():
        assert "float32" in HummingKernel.unsupported(LinearSpec(3, 128, False, "auto_round", 512, 256, torch.float32),
                                                      torch.device("cuda"))
        assert "5-bit" in HummingKernel.unsupported(LinearSpec(5, 128, True, "gptq", 512, 256, torch.bfloat16),
                                                    torch.device("cuda"))
    with pytest.raises(ValueError, match="humming.*needs a CUDA device"):
        select_kernel(spec, torch.device("cpu"), "humming")


gpu = pytest.mark.skipif(not torch.cuda.is_available() or KERNELS["humming"].unsupported(
    LinearSpec(4, 128, True, "gptq", 512, 256, torch.bfloat16), torch.device("cuda")) is not None,
    reason="needs a CUDA GPU and humming-kernels")


def prepared(spec, packed):
    dev = torch.device("cuda")
    ckpt = [t.to(dev) for t in (packed.qweight, packed.qzeros, packed.scales)]
    return HummingKernel.prepare(spec, *ckpt)


# Each distinct layer is compiled on first use (seconds each), so the GPU cases cover every bit width,
# layout and group kind once rather than their full product.
GPU_CASES = [(b, True, "gptq", 128, torch.bfloat16) for b in (2, 3, 4, 8)]
GPU_CASES += [(b, False, "auto_round", 128, torch.bfloat16) for b in (2, 3, 4, 8)]
GPU_CASES += [(4, False, "awq", 128, torch.float16), (3, False, "gptq", 32, torch.bfloat16),
              (2, True, "gptq", -1, torch.float16), (4, True, "gptq", 64, torch.float16)]


@gpu
@pytest.mark.parametrize("bits, sym, layout, group_size, dtype", GPU_CASES)
def test_products_match_the_reference(bits, sym, layout, group_size, dtype):
    spec, packed, w = case(bits, group_size, sym, layout, n=512, k=1024)
    spec = LinearSpec(bits, group_size, sym, layout, 1024, 512, dtype)
    state = prepared(spec, packed)
    for m in (1, 7, 64, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=dtype)
        ref = x.float() @ w.cuda().T
        y = HummingKernel.apply(spec, state, x, None)
        assert y.dtype == dtype and y.shape == (m, 512)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (m, err)


@gpu
def test_bias_batch_dims_graph_and_compile():
    spec, packed, w = case(3, 128, False, "auto_round", n=512, k=1024)
    state = prepared(spec, packed)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.cuda().T + bias.float()
    y = HummingKernel.apply(spec, state, x, bias)
    assert y.shape == (2, 3, 512)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2

    graph = torch.cuda.CUDAGraph()
    static = x.reshape(6, 1024).clone()
    HummingKernel.apply(spec, state, static, None)  # compiled for this M before capture
    with torch.cuda.graph(graph):
        out = HummingKernel.apply(spec, state, static, None)
    static.copy_(torch.randn_like(static))
    graph.replay()
    # humming's split-K sums in no fixed order (two eager calls differ by ~0.3%, H200), so the replay is
    # checked against the reference, not bit for bit against an eager call
    ref = static.float() @ w.cuda().T
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2

    compiled = torch.compile(lambda t: HummingKernel.apply(spec, state, t, bias), fullgraph=True, dynamic=True)
    for m in (1, 5):
        t = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = t.float() @ w.cuda().T + bias.float()
        assert ((compiled(t).float() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
def test_dispatch_picks_humming_for_3bit():
    spec = LinearSpec(3, 128, False, "auto_round", 1024, 512, torch.bfloat16)
    assert select_kernel(spec, torch.device("cuda")).name == "humming"
