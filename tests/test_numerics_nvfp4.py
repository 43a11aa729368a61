"""quantize.numerics_nvfp4 against a float32 step-by-step reference, compressed-tensors 0.17 (global scale,
compressor, decompressor) and AutoRound 0.16.1's ``nv_fp4`` and fused-layer global scales."""

import numpy as np
import pytest
import torch
from fp_reference import nvfp4 as ref_nvfp4

from quantize import numerics_nvfp4 as nv


def weights(seed: int, n: int = 8, k: int = 64) -> torch.Tensor:
    """Row magnitudes over 2**-10 .. 2**3, an all-zero group, and a group far below the tensor's amax
    (its FP8 scale would round to 0 without the floor)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.linspace(-10, 3, n)).unsqueeze(1)
    w[0, :16] = 0
    w[1, 16:32] *= 1e-6
    return w


def test_matches_reference():
    w = weights(0)
    gs = nv.weight_global_scale(w)
    packed, scales = nv.quantize_weight(w, gs)
    deq = nv.dequantize(packed, scales, gs)
    for r in range(w.shape[0]):
        expected, ref_scales = ref_nvfp4(w[r].tolist(), np.float32(gs.item()))
        assert deq[r].tolist() == expected
        assert scales[r].float().tolist() == ref_scales
    assert torch.equal(nv.fake_quantize(w, gs), deq)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert scales.shape == (8, 4) and scales.dtype == torch.float8_e4m3fn
    assert (scales.float() >= 2.0**-9).all()  # no stored scale is 0


def test_global_scale_is_compressed_tensors():
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    for amax in (1e-3, 0.0371, 0.5, 1.0, 7.25, 300.0):
        a = torch.tensor(amax)
        assert torch.equal(nv.global_scale(a).reshape(1), generate_gparam(-a.reshape(1), a.reshape(1) / 2))
    assert nv.global_scale(0.0).item() == 1.0 == generate_gparam(torch.zeros(1), torch.zeros(1)).item()


def test_fused_layers_share_the_minimum_global_scale():
    """As AutoRound's ``update_fused_layer_global_scales`` leaves q/k/v (and gate/up) after its pass: the
    minimum of the parts' scales, i.e. the scale of the largest amax. A zero part does not win."""
    from auto_round.data_type.nvfp import calculate_gparam
    from auto_round.data_type.utils import update_fused_layer_global_scales

    parts = [torch.randn(8, 16) * s for s in (0.5, 2.0, 1.0)]
    amaxes = [p.abs().amax() for p in parts]
    fused = nv.fused_global_scale(amaxes)
    assert torch.equal(fused, min(nv.global_scale(a) for a in amaxes))
    assert torch.equal(fused, nv.global_scale(max(amaxes)))
    assert torch.equal(nv.fused_global_scale(amaxes + [torch.tensor(0.0)]), fused)

    attn = torch.nn.Module()
    for name, p in zip(("q_proj", "k_proj", "v_proj"), parts):
        layer = torch.nn.Linear(16, 8, bias=False)
        layer.weight.data = p
        layer.weight_global_scale = calculate_gparam(p)
        setattr(attn, name, layer)
    update_fused_layer_global_scales(attn)
    # AutoRound computes 2688 * (1 / amax): within a float32 ulp of ours, and the same minimum
    assert torch.allclose(attn.q_proj.weight_global_scale, fused, rtol=2e-7, atol=0)
    assert attn.q_proj.weight_global_scale == attn.v_proj.weight_global_scale


def test_matches_autoround_nv_fp4():
    """Intel's ``nv_fp4`` multiplies by reciprocals where compressed-tensors (and we) divide: same group
    scales, same FP4 codes except where ``w / (s / gs)`` sits on a rounding tie, values within a float32 ulp
    (``q * (1 / (1 / eff))`` against ``q * eff``). Its all-zero group gets scale 0 where ours is floored."""
    from auto_round.data_type.nvfp import nv_fp4

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[0, :16] = 0
    gs = nv.weight_global_scale(w)
    ours = nv.fake_quantize(w, gs)
    theirs, their_scales, _ = nv_fp4(w, group_size=16, global_scale=gs)
    ours_scales = nv.quantize_weight(w, gs)[1].float().reshape(-1, 1)
    differ = (ours_scales != their_scales).squeeze(1)
    assert differ.nonzero().tolist() == [[0]] and their_scales[0].item() == 0 and ours_scales[0].item() == 2.0**-9
    eff = (ours_scales / gs).reshape(64, 16, 1)
    codes_ours = (ours.reshape(64, 16, 16) / eff).round(decimals=3)
    codes_theirs = (theirs.reshape(64, 16, 16) / eff).round(decimals=3)
    assert set(codes_ours.abs().unique().tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert (codes_ours != codes_theirs).float().mean() < 1e-3
    same = (codes_ours == codes_theirs).reshape(64, 256)
    assert torch.allclose(ours[same], theirs[same], rtol=2.4e-7, atol=0)


def test_signround_parameters_and_autoround_gradients():
    from auto_round.data_type.nvfp import nv_fp4

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 64, generator=gen) * 0.05
    gs = nv.weight_global_scale(w)
    v0 = (torch.rand(4, 64, generator=gen) - 0.5) * 0.5
    s0 = 0.6 + 0.4 * torch.rand(4, 4, generator=gen)
    v1, s1 = v0.clone().requires_grad_(), s0.clone().requires_grad_()
    v2, s2 = v0.clone().requires_grad_(), s0.clone().requires_grad_()
    target = torch.randn(4, 64, generator=gen) * 0.05
    ours = nv.fake_quantize(w, gs, v1, s1)
    theirs, _, _ = nv_fp4(w, group_size=16, v=v2.reshape(-1, 16), global_scale=gs, max_scale=s2.reshape(-1))
    theirs = theirs.reshape(4, 64)
    assert torch.isclose(ours, theirs, rtol=1e-6, atol=0).float().mean() > 0.99
    ((ours - target) ** 2).sum().backward()
    ((theirs - target) ** 2).sum().backward()
    assert v1.grad.abs().sum() > 0 and s1.grad.abs().sum() > 0
    # same gradient signs (SignRound steps on signs), magnitudes within the reciprocal arithmetic's error
    assert (torch.sign(v1.grad) == torch.sign(v2.grad)).float().mean() > 0.98
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-2, atol=1e-6)
    # the clipping factor moves the group scale; the global scale is the caller's and stays fixed
    scales_full = nv.quantize_weight(w, gs)[1].float()
    scales_clipped = nv.quantize_weight(w, gs, max_scale=0.5)[1].float()
    assert (scales_clipped < scales_full).all()


def test_compressed_tensors_compresses_and_decompresses_to_ours(monkeypatch):
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    monkeypatch.setattr(FP4_E2M1_DATA, "cast_to_fp4", staticmethod(getattr(FP4_E2M1_DATA.cast_to_fp4, "__wrapped__", FP4_E2M1_DATA.cast_to_fp4)))
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    w = weights(3).to(torch.bfloat16).float()
    gs = nv.weight_global_scale(w)
    packed, scales = nv.quantize_weight(w, gs)

    state = {"weight": w, "weight_scale": scales.float(), "weight_global_scale": gs.reshape(1)}
    compressed = NVFP4PackedCompressor.compress(state, scheme)
    assert torch.equal(compressed["weight_packed"], packed)
    assert torch.equal(compressed["weight_scale"].view(torch.uint8), scales.view(torch.uint8))

    state = {"weight_packed": packed, "weight_scale": scales, "weight_global_scale": gs.reshape(1)}
    restored = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(restored, nv.dequantize(packed, scales, gs, torch.bfloat16))


def test_group_must_divide():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        nv.fake_quantize(torch.randn(2, 40), 1.0)


def test_group_scales_are_compressed_tensors_calculate_qparams():
    """llm-compressor's own NVFP4 scale rule (``calculate_qparams`` with the global scale) gives our group
    scales, all-zero groups aside (it stores 0.125 there, we 2**-9; both dequantize the zeros to 0)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from quantize.numerics import to_groups

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(7)) * 0.03
    gs = nv.weight_global_scale(w)
    wg = to_groups(w, 16)
    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    theirs, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args, global_scale=gs.reshape(1))
    assert torch.equal(theirs.float(), nv.quantize_weight(w, gs)[1].float())
