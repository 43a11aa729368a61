"""quantize.numerics_act (activation fake-quantization) and quantize.numerics_int8 (the W8A8 weight rule)
against loop references, AutoRound 0.16.1's activation functions and compressed-tensors 0.17's
``int-quantized`` compressor."""

import numpy as np
import pytest
import torch
from fp_reference import f32, fp8_scaled

from quantize import numerics_act as act
from quantize import numerics_int8 as i8
from quantize import numerics_mx as mx
from quantize import numerics_nvfp4 as nv


def activations(seed: int, shape=(2, 3, 256)) -> torch.Tensor:
    """Token-like rows with a few outlier channels and one all-zero token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., 7] *= 30
    x[0, 1] = 0
    return x


def ref_int(row: list[float], bits: int) -> list[float]:
    qmax = 2 ** (bits - 1) - 1
    scale = max(max(abs(f32(v)) for v in row) / f32(qmax), f32(i8.MIN_SCALE))
    return [float(f32(min(max(round(float(f32(v) / scale)), -qmax - 1), qmax)) * scale) for v in row]


# ---- int8 W8A8 weights (numerics_int8) ----


@pytest.mark.parametrize("bits", [8, 4])
def test_int_weight_matches_reference(bits):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    w[2] = 0
    q, scale = i8.quantize_weight(w, bits)
    assert q.dtype == torch.int8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    deq = i8.dequantize(q, scale)
    for r in range(6):
        assert deq[r].tolist() == ref_int(w[r].tolist(), bits)
    assert torch.equal(i8.fake_quantize(w, bits), deq)
    assert q.abs().amax(dim=1)[[0, 1, 3]].tolist() == [2 ** (bits - 1) - 1] * 3  # ±amax lands on ±qmax


def test_int8_weight_is_compressed_tensors_int_quantized():
    from compressed_tensors.compressors import IntQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q, scale = i8.quantize_weight(w)
    compressed = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    assert torch.equal(compressed["weight"], q)
    restored = IntQuantizationCompressor.decompress({"weight": q, "weight_scale": scale}, scheme)["weight"]
    assert torch.equal(restored, i8.dequantize(q, scale))


def test_int8_offset_reaches_minus_128_and_gradients_flow():
    w = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])
    q, _ = i8.quantize_weight(w, v=torch.tensor([[-0.6, 0.0, 0.0, 0.6]]))
    assert q.tolist() == [[-128, 64, 32, 127]]
    v = torch.zeros(4, 32, requires_grad=True)
    ms = torch.ones(4, 1, requires_grad=True)
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    ((i8.fake_quantize(w, 8, v, ms) - w * 0.9) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and ms.grad.abs().sum() > 0


# ---- activations (numerics_act) ----


def test_int_per_token_matches_reference():
    x = activations(1)
    for bits in (8, 4):
        y = act.int_per_token(x, bits)
        rows = x.reshape(-1, 256).tolist()
        assert y.reshape(-1, 256).tolist() == [ref_int(r, bits) for r in rows]


def test_fp8_static_matches_reference_and_autoround():
    from auto_round.data_type.fp8 import quant_fp8_sym

    x = activations(2)
    amax = x.abs().amax() * 0.5  # a calibrated amax below this batch's: some values clip
    scale = act.fp8_static_scale(amax)
    y = act.fp8_static(x, scale)
    assert y.reshape(-1).tolist() == [fp8_scaled(v, f32(scale.item())) for v in x.reshape(-1).tolist()]
    theirs, _, _ = quant_fp8_sym(x, group_size=0, tensor_max=amax)
    assert torch.equal(y, theirs)


def test_fp8_group_dynamic_matches_reference_and_autoround():
    from auto_round.data_type.fp8 import quant_fp8_sym

    x = activations(3)
    y = act.fp8_group_dynamic(x)
    rows = x.reshape(-1, 256).tolist()
    expected = []
    for r in rows:
        for j in range(0, 256, 128):
            grp = r[j : j + 128]
            s = max(max(abs(f32(v)) for v in grp), f32(1e-10)) / f32(448.0)
            expected += [fp8_scaled(v, s) for v in grp]
    assert y.reshape(-1).tolist() == expected
    theirs, _, _ = quant_fp8_sym(x, group_size=128)
    assert torch.equal(y, theirs.reshape(x.shape))  # AutoRound's scale floor differs only for amax < 1/512


@pytest.mark.parametrize("name,bits", [("mxfp4", 4), ("mxfp8", 8)])
def test_mx_dynamic_matches_autoround(name, bits):
    from auto_round.data_type.mxfp import quant_mx

    fmt = mx.MXFP4 if bits == 4 else mx.MXFP8
    x = activations(4)
    y = act.mx_dynamic(x, fmt)
    theirs, _, _ = quant_mx(x, bits=bits, group_size=32, data_type="mx_fp")
    assert torch.equal(y, theirs.reshape(x.shape))
    assert torch.equal(y, mx.fake_quantize(x.reshape(-1, 256), fmt).reshape(x.shape))


def test_nvfp4_activations_match_autoround_static_global_scale():
    from auto_round.data_type.nvfp import nv_fp4_with_static_gs

    x = activations(5)
    gs = nv.global_scale(x.abs().amax() * 0.8)  # calibrated on other batches
    y = act.nvfp4(x, gs)
    assert torch.equal(y, nv.fake_quantize(x.reshape(-1, 256), gs).reshape(x.shape))
    theirs, _, _ = nv_fp4_with_static_gs(x, group_size=16, global_scale=gs)
    # reciprocal vs division arithmetic (see numerics_nvfp4): equal up to float32 last bits and rare ties
    assert torch.isclose(y, theirs.reshape(x.shape), rtol=2.4e-7, atol=0).float().mean() > 0.999


def test_dtype_shape_and_gradients():
    x = activations(6).to(torch.bfloat16).requires_grad_()
    dynamic = [
        lambda t: act.fp8_group_dynamic(t),
        lambda t: act.mx_dynamic(t, mx.MXFP4),
        lambda t: act.nvfp4(t, nv.global_scale(30.0)),
        lambda t: act.int_per_token(t, 8),
    ]
    for f in dynamic:
        y = f(x)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        (g,) = torch.autograd.grad(y.float().sum(), x)
        assert torch.equal(g, torch.ones_like(g))  # straight-through as a whole
    # static FP8: straight-through inside the range, zero beyond it, and a gradient for the clipping factor
    xf = activations(6).requires_grad_()
    ms = torch.tensor(0.5, requires_grad=True)
    scale = act.fp8_static_scale(xf.detach().abs().amax(), ms)
    y = act.fp8_static(xf, scale)
    gx, gs = torch.autograd.grad((y * torch.randn_like(y)).sum(), (xf, ms))
    clipped = xf.detach().abs() > scale.detach() * 448
    assert clipped.any() and (gx[clipped] == 0).all() and gs.item() != 0


def test_groups_must_divide():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        act.fp8_group_dynamic(torch.randn(2, 200))
    assert np.isclose(act.fp8_static_scale(448.0).item(), 1.0)


def test_int8_scale_differs_from_llm_compressor_observer_by_design():
    """Known difference: compressed-tensors' ``calculate_qparams`` divides the amax by 127.5 (half the
    255-wide int8 range), so ``+amax`` rounds to 128 and clips to 127; ours divides by 127 (vLLM's dynamic
    rule), so ``±amax`` are exact. The checkpoint stores the scale, so loaders are unaffected."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    args = preset_name_to_scheme("W8A8", ["Linear"]).weights
    theirs, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    amax = w.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(theirs, amax / 127.5) and torch.allclose(i8.row_scales(w), amax / 127)


def test_fp8_group_dynamic_ue8m0_scales_are_powers_of_two_rounded_up():
    from quantize.numerics_fp import ceil_pow2

    s = torch.tensor([0.75, 1.0, 1.0000001, 3.0, 2.0**-130, 5e-7])
    assert ceil_pow2(s).tolist() == [1.0, 1.0, 2.0, 4.0, 2.0**-130, 2.0**-20]
    x = activations(7)
    y = act.fp8_group_dynamic(x, ue8m0=True)
    rows = x.reshape(-1, 128)
    scale = ceil_pow2(rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 448)
    assert torch.equal(y.reshape(-1, 128), (rows / scale).to(torch.float8_e4m3fn).float() * scale)
    assert not torch.equal(y, act.fp8_group_dynamic(x))
