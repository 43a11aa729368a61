"""quantize.numerics_fp (FP4 E2M1, FP8 E4M3, E8M0, FP4 packing) against the readable references of
fp_reference.py, torch's float8 dtypes, compressed-tensors 0.17 and AutoRound 0.16.1."""

import math

import pytest
import torch
from fp_reference import FP4, FP8, cast as ref_cast, code as ref_code

from quantize.numerics_fp import (
    FP4_E2M1,
    FP8_E4M3,
    cast,
    cast_ste,
    cast_ste_relative,
    decode,
    e8m0_decode,
    e8m0_encode,
    encode,
    floor_log2,
    grid_values,
    pack_fp4,
    round_to_grid,
    unpack_fp4,
)

FORMATS = {"fp4": (FP4_E2M1, FP4), "fp8": (FP8_E4M3, FP8)}


def probe_values(values: list[float], seed: int = 0) -> torch.Tensor:
    """Every grid value, every midpoint (the ties), one float32 ulp either side of each, values past
    the max, tiny values, and random values across the range; both signs (float32)."""
    g = torch.tensor(values, dtype=torch.float32)
    mids = (g[1:] + g[:-1]) / 2  # exact: the grid needs few bits
    near = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    gen = torch.Generator().manual_seed(seed)
    top = values[-1]
    rand = torch.rand(2000, generator=gen) * top * 1.2
    logs = torch.exp2(torch.rand(2000, generator=gen) * 30 - 20)  # 2**-20 .. 2**10: subnormals, saturation
    extra = torch.tensor([top * 1.0001, top * 1.07, top * 2, 1e30, 2.0**-149, 0.0])
    x = torch.cat([g, mids, near, rand, logs, extra])
    return torch.cat([x, -x])


def test_reference_grids_are_the_formats():
    assert FP4 == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert len(FP8) == 127 and FP8[1] == 2.0**-9 and FP8[8] == 2.0**-6 and FP8[-1] == 448.0
    assert (FP4_E2M1.emax, FP8_E4M3.emax) == (2, 8)


@pytest.mark.parametrize("name", ["fp4", "fp8"])
def test_cast_matches_reference(name):
    fmt, values = FORMATS[name]
    x = probe_values(values)
    expected = torch.tensor([ref_cast(float(v), values) for v in x])
    before = x.clone()
    for ours in (cast(x, fmt), round_to_grid(x, fmt)):
        assert torch.equal(ours, expected)
        # the sign of zero is kept (-0.2 rounds to -0.0), as the packers need it
        assert torch.equal(torch.signbit(ours), torch.signbit(x))
    assert torch.equal(x, before)  # round_to_grid's in-place steps work on its own copy


def test_fp8_cast_is_torch_float8_e4m3fn_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([probe_values(FP8), torch.randn(100_000, generator=gen) * 50])
    ours = round_to_grid(x, FP8_E4M3)  # the arithmetic rule; cast() uses torch's, so this pins them together
    theirs = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(ours, theirs.float())
    assert torch.equal(encode(ours, FP8_E4M3), theirs.view(torch.uint8))


def test_fp4_cast_is_compressed_tensors_and_autoround():
    from auto_round.data_type.nvfp import cast_to_fp4 as ar_cast_to_fp4
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    x = probe_values(FP4).clamp(-6, 6)
    ours = cast(x, FP4_E2M1)
    ct_cast = getattr(FP4_E2M1_DATA.cast_to_fp4, "__wrapped__", FP4_E2M1_DATA.cast_to_fp4)  # the function under its torch.compile wrapper
    assert torch.equal(ct_cast(x.clone()), ours)
    assert torch.equal(ar_cast_to_fp4(x), ours)


def assert_mx_element_rounding_matches_autoround(x, fmt, ebits, mbits):
    """AutoRound's MX ``quant_element`` rounds as we do except on one input per sign: the float32 just
    below half the smallest subnormal. Its ``floor(t + 0.5)`` rounds ``t + 0.5`` (``1 - 2**-25``) up to 1.0
    first, so it returns the smallest subnormal where round-to-nearest gives 0. Ours is exact (intended)."""
    from auto_round.data_type.mxfp import quant_element

    ours = cast(x, fmt)
    theirs = quant_element(x, ebits, mbits, fmt.max)
    differ = theirs != ours
    half_tiny = torch.tensor(2.0 ** (fmt.emin - fmt.mbits - 1))
    just_below = torch.nextafter(half_tiny, torch.tensor(0.0))
    assert torch.equal(x[differ].abs().unique(), just_below.reshape(1))
    assert (ours[differ] == 0).all() and torch.equal(theirs[differ].abs().unique(), 2 * half_tiny.reshape(1))


def test_fp4_cast_is_autoround_mx_element_rounding():
    assert_mx_element_rounding_matches_autoround(probe_values(FP4).clamp(-6, 6), FP4_E2M1, 2, 3)


def test_fp8_cast_is_autoround_mx_element_rounding():
    assert_mx_element_rounding_matches_autoround(probe_values(FP8).clamp(-448, 448), FP8_E4M3, 4, 5)


@pytest.mark.parametrize("name", ["fp4", "fp8"])
def test_encode_decode_every_code(name):
    fmt, values = FORMATS[name]
    g = torch.tensor(values + [-v for v in values])
    codes = encode(g, fmt)
    assert codes.tolist() == [ref_code(float(v), values) for v in g]
    assert torch.equal(decode(codes, fmt), g)
    assert encode(torch.tensor([-0.0]), fmt).item() == 1 << (fmt.bits - 1)
    table = grid_values(fmt)
    assert table.numel() == 2**fmt.bits
    if name == "fp8":  # the table is torch's reading of every byte, NaN codes included
        every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        assert torch.equal(table.isnan(), every.isnan()) and torch.equal(table[~table.isnan()], every[~every.isnan()])


def test_fp4_packing_is_compressed_tensors_bit_for_bit():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 16, (6, 64), generator=gen)
    q = decode(idx.to(torch.uint8), FP4_E2M1)  # every code, -0.0 included
    packed = pack_fp4(encode(q, FP4_E2M1))
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed, pack_fp4_to_uint8(q))
    assert torch.equal(packed[0, 0], (idx[0, 0] | (idx[0, 1] << 4)).to(torch.uint8))  # element 0: low nibble
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    ct = unpack_fp4_from_uint8(every_byte, 4, 128, dtype=torch.float32)
    assert torch.equal(decode(unpack_fp4(every_byte), FP4_E2M1), ct)
    assert torch.equal(pack_fp4(unpack_fp4(every_byte)), every_byte)
    with pytest.raises(ValueError, match="even number"):
        pack_fp4(torch.zeros(2, 3, dtype=torch.uint8))


def test_floor_log2_is_exact_where_float_log2_is_not():
    powers = torch.tensor([2.0**k for k in range(-149, 128)])
    below = torch.nextafter(powers, torch.zeros(()))
    above = torch.nextafter(powers, torch.full((), math.inf))
    for x in (powers, below, above):
        assert floor_log2(x).tolist() == [math.frexp(v)[1] - 1 for v in x.tolist()]
    # float log2 rounds the value just below 16 up to 4.0: a floor through it would be off by one
    just_below_16 = torch.nextafter(torch.tensor(16.0), torch.tensor(0.0))
    assert torch.log2(just_below_16).floor().item() == 4 and floor_log2(just_below_16).item() == 3


def test_e8m0_in_integers():
    from compressed_tensors.compressors.mx_utils import compress_mx_scale, decompress_mx_scale

    e = torch.arange(-127, 128, dtype=torch.int32)
    codes = e8m0_encode(e)
    assert codes.dtype == torch.uint8 and codes.min() == 0 and codes.max() == 254
    scales = e8m0_decode(codes)
    assert scales.tolist() == [2.0**k for k in range(-127, 128)]
    assert torch.equal(decompress_mx_scale(codes).float(), scales)
    assert torch.equal(compress_mx_scale(scales, torch.uint8), codes)
    # torch's float8_e8m0fnu cast rounds to the nearest power of two (3.0 -> 4.0); floor_log2 does not
    assert torch.tensor([3.0]).to(torch.float8_e8m0fnu).float().item() == 4.0
    assert e8m0_decode(e8m0_encode(floor_log2(torch.tensor([3.0])))).item() == 2.0
    with pytest.raises(TypeError, match="integer exponents"):
        e8m0_encode(torch.tensor([3.0]))


@pytest.mark.parametrize("name", ["fp4", "fp8"])
def test_straight_through_forms(name):
    fmt, values = FORMATS[name]
    gen = torch.Generator().manual_seed(3)
    x = ((torch.rand(500, generator=gen) * 2 - 1) * values[-1]).requires_grad_()
    for f in (cast_ste, cast_ste_relative):
        y = f(x, fmt)
        assert torch.equal(y, cast(x.detach(), fmt))  # forward exact, not merely close
        (g,) = torch.autograd.grad(y.sum(), x)
        if f is cast_ste:
            assert torch.equal(g, torch.ones_like(g))
    normal = x.detach().abs() >= 2.0**fmt.emin
    expected = torch.where(normal, cast(x.detach(), fmt) / x.detach(), torch.ones_like(g))
    assert torch.allclose(g, expected)


@pytest.mark.parametrize("name", ["fp4", "fp8"])
def test_relative_gradient_is_autorounds_mx_element_gradient(name):
    from auto_round.data_type.mxfp import quant_element

    fmt, values = FORMATS[name]
    ebits, mbits = (2, 3) if name == "fp4" else (4, 5)  # AutoRound counts sign and implicit bit in mbits
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(500, generator=gen) * 2 - 1) * values[-1]
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(cast_ste_relative(a, fmt).sum(), a)
    (gb,) = torch.autograd.grad(quant_element(b, ebits, mbits, values[-1]).sum(), b)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6)
