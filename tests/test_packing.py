"""Packed layouts: round trips, and equality with readable bit-by-bit references of GPTQ and AWQ."""

import pytest
import torch

from quantize.packing import AWQ_ORDER, LAYOUTS, layout_fits, pack, pack_bits, packed_shapes, unpack, unpack_bits


def stream_reference(codes: list[int], bits: int) -> list[int]:
    """Little-endian bit stream cut into unsigned 32-bit words, one bit at a time."""
    stream = [(c >> b) & 1 for c in codes for b in range(bits)]
    return [sum(bit << i for i, bit in enumerate(stream[w : w + 32])) for w in range(0, len(stream), 32)]


def as_unsigned(t: torch.Tensor) -> list[int]:
    return [x & 0xFFFFFFFF for x in t.tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_matches_stream_reference(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 64))
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 64 * bits // 32)
    for row in range(3):
        assert as_unsigned(words[row]) == stream_reference(codes[row].tolist(), bits)
    assert torch.equal(unpack_bits(words, bits, 64), codes.to(torch.uint8))


def test_gptq_3bit_word_boundaries():
    # GPTQ's 3-bit layout: code 10 straddles words 0 and 1, code 21 straddles words 1 and 2.
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b111
    codes[0, 21] = 0b101
    w = as_unsigned(pack_bits(codes, 3)[0])
    assert w[0] == 0b11 << 30 and w[1] == (0b1 | (0b01 << 31)) and w[2] == 0b10


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_bits_reads_any_whole_words(bits):
    # A prefix of the words (3-bit: not a whole 3-word period), and the strided view the gptq layout reads.
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 96))
    words = pack_bits(codes, bits)
    n = 64 // bits  # the codes that two words hold completely
    assert torch.equal(unpack_bits(words[:, :2], bits, n), codes[:, :n].to(torch.uint8))
    strided = words.t().contiguous().t()
    assert not strided.is_contiguous()
    assert torch.equal(unpack_bits(strided, bits, 96), codes.to(torch.uint8))


@pytest.mark.parametrize("layout, bits, group_size", [
    (layout, bits, group_size)
    for layout in LAYOUTS for bits in (2, 3, 4, 8) for group_size in (32, 128, -1)
    if layout != "awq" or bits == 4  # awq holds 4-bit only
])
def test_round_trip(layout, bits, group_size):
    torch.manual_seed(bits + group_size)
    n, k = 96, 256
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    scales = torch.randn(n, groups).half()
    zeros = torch.randint(1 if layout == "gptq" else 0, 2**bits, (n, groups), dtype=torch.uint8)
    packed = pack(layout, q, scales, zeros, bits)
    shapes = packed_shapes(layout, bits, k, n, groups)
    assert {f: tuple(getattr(packed, f).shape) for f in shapes} == shapes
    q2, s2, z2 = unpack(layout, packed, bits, k, n)
    assert torch.equal(q2, q) and torch.equal(s2, scales) and torch.equal(z2, zeros)


def test_gptq_layout_reference():
    """qweight packs 32/b codes of one output column along K; qzeros hold zero - 1 along N."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    zeros = torch.full((16, 2), 8, dtype=torch.uint8)
    p = pack("gptq", q, torch.ones(16, 2).half(), zeros, 4)
    for col in range(16):
        for row in range(8):
            expect = sum(int(q[col, row * 8 + i]) << (4 * i) for i in range(8))
            assert p.qweight[row, col].item() & 0xFFFFFFFF == expect
    assert p.qzeros[0, 0].item() & 0xFFFFFFFF == sum(7 << (4 * i) for i in range(8))


def test_awq_layout_reference():
    """AWQ packs along N, slot s of each word holding column AWQ_ORDER[s] of its 8-column group."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (16, 32), dtype=torch.uint8)
    p = pack("awq", q, torch.ones(16, 1).half(), torch.zeros(16, 1, dtype=torch.uint8), 4)
    for k in range(32):
        for word in range(2):
            expect = sum(int(q[word * 8 + AWQ_ORDER[s], k]) << (4 * s) for s in range(8))
            assert p.qweight[k, word].item() & 0xFFFFFFFF == expect


def test_layout_fits_explains():
    assert layout_fits("gptq", 4, 576, 1536) is None
    assert "4-bit" in layout_fits("awq", 3, 512, 512)
    assert "whole 32-bit words" in layout_fits("gptq", 3, 100, 512)
    with pytest.raises(ValueError, match="unknown packing layout"):
        pack("marlin", torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 1).half(), torch.zeros(8, 1, dtype=torch.uint8), 4)
