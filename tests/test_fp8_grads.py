"""Float8 backward products for the signed descent: same forward, gradients whose signs match bf16's."""

import torch
from torch import nn

from quantize.fp8_grads import Fp8GradLinear, fp8_grad_linears, fp8_matmul


def test_fp8_matmul_close_to_float32_product():
    torch.manual_seed(0)
    a, b = torch.randn(64, 256), torch.randn(256, 48)
    ref, out = a @ b, fp8_matmul(a, b).float()
    assert out.dtype == torch.float32 and out.shape == (64, 48)
    assert (out - ref).norm() / ref.norm() < 0.06  # e4m3 keeps 3 mantissa bits: a few percent
    # Where the product is not tiny, its sign is kept.
    big = ref.abs() > 0.1 * ref.abs().mean()
    assert (torch.sign(out) == torch.sign(ref))[big].float().mean() > 0.99


def test_linear_forward_exact_and_gradient_signs_kept():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16)
    grads = []
    for module in (linear, Fp8GradLinear(linear)):
        xi = x.clone().requires_grad_()
        w = linear.weight.detach().clone().requires_grad_()
        y = torch.func.functional_call(module, {"weight": w}, (xi,))
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), xi.grad, w.grad))
    (y_ref, dx_ref, dw_ref), (y, dx, dw) = grads
    assert torch.equal(y, y_ref)  # the loss sees bf16's exact forward
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert (got.float() - ref.float()).norm() / ref.float().norm() < 0.06
        assert (torch.sign(got) == torch.sign(ref)).float().mean() > 0.95


def test_odd_shapes_fall_back_to_exact_products():
    torch.manual_seed(0)
    linear = nn.Linear(24, 10, bias=False)  # 10 and 24 are not multiples of 16
    x = torch.randn(3, 24, requires_grad=True)
    Fp8GradLinear(linear)(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(3, 24))


def test_context_swaps_and_restores_linears():
    block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16)))
    originals = (block[0], block[2][0])
    with fp8_grad_linears(block, ["0", "2.0"]):
        assert isinstance(block[0], Fp8GradLinear) and isinstance(block[2][0], Fp8GradLinear)
        assert block[0].weight is originals[0].weight  # same parameters, so functional_call keys still hold
    assert (block[0], block[2][0]) == originals
