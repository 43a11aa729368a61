"""quantize.numerics_mx (MXFP4 / MXFP8) against a loop reference of the OCP rule, AutoRound 0.16.1's
``quant_mx`` (values and SignRound gradients) and compressed-tensors 0.17's MX compressors."""

import pytest
import torch
from fp_reference import FP4, FP8, mx as ref_mx

from quantize import numerics_mx as mx
from quantize.numerics_fp import decode, e8m0_decode, unpack_fp4

FORMATS = {"mxfp4": (mx.MXFP4, FP4, 4), "mxfp8": (mx.MXFP8, FP8, 8)}


def weights(seed: int, n: int = 8, k: int = 128) -> torch.Tensor:
    """Rows at different magnitudes (2**-12 .. 2**4), one all-zero group, one group holding an exact power of
    two, one with a group max just below a power of two, where a float log2 rounds up."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.linspace(-12, 4, n)).unsqueeze(1)
    w[0, :32] = 0
    w[1, 32:64] = w[1, 32:64].clamp(-1, 1)
    w[1, 40] = 1.0
    w[2, 64:96] = w[2, 64:96].clamp(-0.06, 0.06)
    w[2, 70] = torch.nextafter(torch.tensor(0.0625), torch.tensor(0.0))
    return w


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
def test_matches_reference(name):
    fmt, values, _ = FORMATS[name]
    w = weights(0)
    data, codes = mx.quantize_weight(w, fmt)
    deq = mx.dequantize(data, codes, fmt)
    for r in range(w.shape[0]):
        expected, exps = ref_mx(w[r].tolist(), values)
        assert deq[r].tolist() == expected
        assert (codes[r].int() - 127).tolist() == exps
    assert torch.equal(mx.fake_quantize(w, fmt), deq)
    if fmt == mx.MXFP4:
        assert data.dtype == torch.uint8 and data.shape == (8, 64) and codes.shape == (8, 4)
    else:
        assert data.dtype == torch.float8_e4m3fn and data.shape == (8, 128)


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
def test_matches_autoround_quant_mx(name):
    """Same values and exponents as Intel's ``quant_mx``, except where its float ``log2`` of a group max just
    below a power of two rounds up (our row 2, group 2): there it picks a scale twice too large."""
    from auto_round.data_type.mxfp import quant_mx

    fmt, _, bits = FORMATS[name]
    w = weights(1)
    ours = mx.fake_quantize(w, fmt)
    theirs, shared_exp, _ = quant_mx(w, bits=bits, group_size=32, data_type="mx_fp")
    codes = mx.quantize_weight(w, fmt)[1]
    exp_ours = codes.int() - 127
    exp_theirs = shared_exp.reshape(codes.shape).int()
    off = exp_ours != exp_theirs
    log2_rounds_up = torch.log2(torch.tensor(0.0625).nextafter(torch.tensor(0.0))).item() == -4.0
    assert off.nonzero().tolist() == ([[2, 2]] if log2_rounds_up else [])
    assert (exp_theirs[off] == exp_ours[off] + 1).all()
    same = ~off.repeat_interleave(32, dim=1)
    assert torch.equal(ours[same], theirs[same])


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
def test_signround_parameters_match_autoround(name):
    """With a rounding offset and clipping factors, values and gradients are Intel's (the offset enters after
    the division by the scale; the factor moves the exponent, gradient through a straight-through floor)."""
    from auto_round.data_type.mxfp import quant_mx

    fmt, _, bits = FORMATS[name]
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 64, generator=gen) * 0.02
    v0 = (torch.rand(6, 64, generator=gen) - 0.5) * 0.5
    s0 = 0.5 + torch.rand(6, 2, generator=gen)  # crosses powers of two for some groups
    v1, s1 = v0.clone().requires_grad_(), s0.clone().requires_grad_()
    v2, s2 = v0.clone().requires_grad_(), s0.clone().requires_grad_()
    target = torch.randn(6, 64, generator=gen) * 0.02

    ours = mx.fake_quantize(w, fmt, v1, s1)
    theirs, _, _ = quant_mx(w, bits=bits, group_size=32, v=v2.reshape(-1, 32), max_scale=s2.reshape(-1),
                            data_type="mx_fp")
    assert torch.equal(ours, theirs.reshape(6, 64))
    ((ours - target) ** 2).sum().backward()
    ((theirs.reshape(6, 64) - target) ** 2).sum().backward()
    assert torch.allclose(v1.grad, v2.grad, rtol=1e-4, atol=1e-12)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-12)
    assert s1.grad.abs().sum() > 0 and v1.grad.abs().sum() > 0


def test_clipping_factor_moves_the_exponent():
    w = torch.full((1, 32), 0.3)
    assert mx.quantize_weight(w, mx.MXFP4)[1].item() == 127 - 2 - 2  # floor(log2 0.3) = -2
    assert mx.quantize_weight(w, mx.MXFP4, max_scale=0.9)[1].item() == 127 - 2 - 2  # 0.27: same binade
    assert mx.quantize_weight(w, mx.MXFP4, max_scale=0.5)[1].item() == 127 - 3 - 2
    assert mx.quantize_weight(w, mx.MXFP4, max_scale=torch.tensor([[2.0]]))[1].item() == 127 - 1 - 2


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
def test_compressed_tensors_compresses_and_decompresses_to_ours(name, monkeypatch):
    """compressed-tensors' own compressor, given our scales, writes our bytes; its decompressor reads our
    bytes back to our weights (it decompresses in bfloat16, where MX values are exact)."""
    from compressed_tensors.compressors import MXFP4PackedCompressor, MXFP8QuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    # the same function without its torch.compile wrapper (compiling costs minutes on this CPU)
    monkeypatch.setattr(FP4_E2M1_DATA, "cast_to_fp4", staticmethod(getattr(FP4_E2M1_DATA.cast_to_fp4, "__wrapped__", FP4_E2M1_DATA.cast_to_fp4)))
    fmt, _, _ = FORMATS[name]
    compressor = MXFP4PackedCompressor if fmt == mx.MXFP4 else MXFP8QuantizationCompressor
    scheme = preset_name_to_scheme(name.upper(), ["Linear"])
    w = weights(3).to(torch.bfloat16).float()
    data, codes = mx.quantize_weight(w, fmt)
    key = "weight_packed" if fmt == mx.MXFP4 else "weight"

    compressed = compressor.compress({"weight": w, "weight_scale": e8m0_decode(codes)}, scheme)
    assert torch.equal(compressed["weight_scale"], codes)
    assert torch.equal(compressed[key].view(torch.uint8), data.view(torch.uint8))

    restored = compressor.decompress({key: data, "weight_scale": codes}, scheme)["weight"]
    assert torch.equal(restored, mx.dequantize(data, codes, fmt, torch.bfloat16))


def test_compressed_tensors_calibration_rounds_some_exponents_up():
    """Known, intended difference: compressed-tensors' ``generate_mx_scales`` (used when llm-compressor
    calibrates) takes the next power of two for a group max whose mantissa is >= 1.75; ours, like AutoRound
    and the OCP spec, floors. Checkpoints store the exponent, so loading is unaffected."""
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    amax = torch.tensor([1.5, 1.74, 1.75, 1.9, 3.0])
    ours = mx.shared_exponent(amax, mx.MXFP4) + 127
    theirs = generate_mx_scales(amax, num_bits=4)
    assert ours.tolist() == [125, 125, 125, 125, 126]
    assert theirs.tolist() == [125, 125, 126, 126, 126]


def test_decode_of_packed_storage():
    w = weights(4)
    data, codes = mx.quantize_weight(w, mx.MXFP4)
    q = decode(unpack_fp4(data), mx.MXFP4)
    assert set(q.abs().unique().tolist()) <= set(FP4)


def test_group_must_divide():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        mx.fake_quantize(torch.randn(2, 48), mx.MXFP4)
