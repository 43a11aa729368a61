"""The cuda_gemv kernel's layout and arithmetic, checked on the CPU (the kernel itself: tests/test_cuda.py)."""

import torch

from quantize.kernels.cuda_gemv import CudaGemvKernel
from quantize.kernels.dispatch import LinearSpec
from quantize.packing import pack_bits


def test_codes_sit_at_four_bits_per_position_of_each_word():
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    words = pack_bits(q, 4)
    assert words.dtype == torch.int32 and words.shape == (3, 8)
    k = torch.arange(64)
    got = (words.long()[:, k // 8] >> (4 * (k % 8))) & 15
    assert torch.equal(got, q.long())


def test_mantissa_trick_gives_the_code_minus_zero_exactly():
    # The kernel's rule: a code at bit position 4p of a 16-bit half word, OR-ed into 2**23's mantissa, is
    # 2**23 + q 2**(4p); subtracting 2**23 + z 2**(4p) leaves (q - z) 2**(4p) exactly, for every q and z.
    q = torch.arange(16).repeat_interleave(16)
    z = torch.arange(16).repeat(16).float()
    for p in range(4):
        bits = ((q << (4 * p)) | 0x4B000000).to(torch.int32)
        code = bits.view(torch.float32)
        d = code - (z * 2.0 ** (4 * p) + 2.0**23)
        assert torch.equal(d, (q.float() - z) * 2.0 ** (4 * p))


def test_refuses_what_it_cannot_compute():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA" in CudaGemvKernel.unsupported(LinearSpec(4, 128, True, "gptq", 4096, 4096, torch.bfloat16), cpu)
    assert "4-bit" in CudaGemvKernel.unsupported(LinearSpec(3, 128, True, "gptq", 4096, 4096, torch.bfloat16), cuda)
    assert "bf16 or fp16" in CudaGemvKernel.unsupported(LinearSpec(4, 128, True, "gptq", 4096, 4096, torch.float32), cuda)
    assert "multiples of 32" in CudaGemvKernel.unsupported(LinearSpec(4, 48, True, "gptq", 4080, 4096, torch.bfloat16), cuda)
