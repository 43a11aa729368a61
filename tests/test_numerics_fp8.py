"""quantize.numerics_fp8 (per channel, per tensor, 128x128 blocks) against a loop reference, AutoRound
0.16.1's ``quant_fp8_sym`` / ``quant_block_fp_sym`` and compressed-tensors 0.17's ``float-quantized``."""

import math

import numpy as np
import pytest
import torch
from fp_reference import f32, fp8_scaled

from quantize import numerics_fp8 as f8


def weights(seed: int, n: int = 200, k: int = 300) -> torch.Tensor:
    """Not multiples of 128 (partial blocks), varied row magnitudes, an all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.linspace(-12, 2, n)).unsqueeze(1)
    w[3] = 0
    return w


def ref_scale(values: list[float]) -> np.float32:
    amax = max(abs(f32(x)) for x in values)
    return max(amax / f32(448.0), f32(f8.MIN_SCALE))


@pytest.mark.parametrize("layout", ["channel", "tensor", "block"])
def test_matches_reference(layout):
    w = weights(0, n=140, k=150) if layout == "block" else weights(0, n=24, k=40)
    q, scales = f8.quantize_weight(w, layout)
    deq = f8.dequantize(q, scales, layout)
    rows = w.tolist()
    n, k = w.shape
    if layout == "channel":
        expected_scales = [[ref_scale(r)] for r in rows]
    elif layout == "tensor":
        expected_scales = [ref_scale(sum(rows, []))]
    else:
        expected_scales = [
            [ref_scale([x for r in rows[i : i + 128] for x in r[j : j + 128]]) for j in range(0, k, 128)]
            for i in range(0, n, 128)
        ]
    assert scales.tolist() == np.array(expected_scales, dtype=np.float32).tolist()
    sample = [(i, j) for i in range(0, n, 7) for j in range(0, k, 3)]
    for i, j in sample:
        s = {"channel": lambda: expected_scales[i][0], "tensor": lambda: expected_scales[0],
             "block": lambda: expected_scales[i // 128][j // 128]}[layout]()
        assert deq[i, j].item() == fp8_scaled(rows[i][j], f32(s))
    assert torch.equal(f8.fake_quantize(w, layout), deq)
    assert q.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    shapes = {"channel": (n, 1), "tensor": (1,), "block": (math.ceil(n / 128), math.ceil(k / 128))}
    assert tuple(scales.shape) == shapes[layout]


@pytest.mark.parametrize("layout", ["channel", "tensor", "block"])
def test_matches_autoround(layout):
    from auto_round.data_type.fp8 import quant_block_fp_sym, quant_fp8_sym

    w = weights(1, n=256, k=384)
    gen = torch.Generator().manual_seed(5)
    v = (torch.rand(w.shape, generator=gen) - 0.5) * 0.5
    if layout == "block":
        theirs, their_scales, _ = quant_block_fp_sym(w, group_size=(128, 128), v=v.reshape(2, 128, 3, 128)
                                                     .permute(0, 2, 1, 3))
    else:
        theirs, their_scales, _ = quant_fp8_sym(w, group_size=-1 if layout == "channel" else 0,
                                                v=v if layout == "channel" else v.reshape(1, -1))
    assert torch.equal(f8.fake_quantize(w, layout, v), theirs)
    assert torch.equal(f8.quantize_weight(w, layout, v)[1].reshape(-1), their_scales.reshape(-1))


def test_clipping_factor_and_gradients():
    w = weights(2, n=16, k=64)
    v = torch.zeros_like(w, requires_grad=True)
    ms = torch.ones(16, 1, requires_grad=True)
    out = f8.fake_quantize(w, "channel", v, ms)
    ((out - w * 1.01) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and ms.grad.abs().sum() > 0
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    clipped = f8.fake_quantize(w, "channel", max_scale=0.5)  # clips each row at half its amax
    assert torch.equal(clipped.abs().amax(dim=1), f8.weight_scales(w, "channel", 0.5).squeeze(1) * 448)


@pytest.mark.parametrize("preset,layout", [("FP8_DYNAMIC", "channel"), ("FP8", "tensor"), ("FP8_BLOCK", "block")])
def test_compressed_tensors_compresses_and_decompresses_to_ours(preset, layout):
    """compressed-tensors' ``float-quantized`` compressor, given our scales, writes our FP8 weights; its
    decompressor gives our weights (``weight = fp8 * scale``, DeepSeek's ``weight_scale_inv`` convention)."""
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    w = weights(3, n=200, k=300) if layout == "block" else weights(3, n=32, k=64)  # partial blocks
    q, scales = f8.quantize_weight(w, layout)
    compressed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scales}, scheme)
    assert torch.equal(compressed["weight"].view(torch.uint8), q.view(torch.uint8))
    if layout == "block":
        # compressed-tensors' decompressor infers the block size as rows // scale rows, wrong for partial
        # blocks (200 // 2 = 100); vLLM's loader knows the block size. Decompress a whole-block weight.
        w = weights(4, n=256, k=384)
        q, scales = f8.quantize_weight(w, layout)
    restored = FloatQuantizationCompressor.decompress({"weight": q, "weight_scale": scales}, scheme)["weight"]
    assert torch.equal(restored.float(), f8.dequantize(q, scales, layout))


def test_unknown_layout():
    with pytest.raises(ValueError, match="'channel', 'tensor' or 'block'"):
        f8.fake_quantize(torch.randn(2, 4), "group")


def test_channel_scales_are_compressed_tensors_calculate_qparams():
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    theirs, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    assert torch.equal(theirs, f8.weight_scales(w, "channel"))
