"""Linear layers whose backward runs in float8, for signed gradient descent.

SignRound steps every tuned parameter by the *sign* of its gradient, so the two backward products of each
linear layer (input gradient ``g @ W`` and weight gradient ``g^T @ x``, two thirds of a tuning step's
matrix work) need only get signs right. On GPUs with float8 tensor cores (compute capability 8.9+) they
run in float8 e4m3 at twice bf16's rate, each operand scaled per row or column of the output by its
absolute maximum over the contracted dimension. The forward product, whose output the loss compares with
the full-precision targets, stays in bf16.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` in float8 with one float32 scale per slice along ``dim`` (its absolute maximum maps to the
    largest float8 value)."""
    scale = t.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-30) / FP8_MAX
    return (t.float() / scale).to(FP8), scale


def fp8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, C] @ b [C, P]`` in float8 (row scales for ``a``, column scales for ``b``), bf16 result."""
    a8, sa = _scaled(a, 1)
    b8, sb = _scaled(b, 0)
    # _scaled_mm wants a row-major and b column-major.
    return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def _fits(*sizes: int) -> bool:
    return all(s % 16 == 0 for s in sizes)  # float8 tensor-core products want multiples of 16


class _Fp8GradLinear(torch.autograd.Function):
    """``x @ w.T + b`` exactly as ``nn.Linear``; the gradients of ``x`` and ``w`` in float8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        mm = fp8_matmul if _fits(*g2.shape, x2.shape[1]) else torch.mm
        dx = mm(g2, w).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = mm(g2.t(), x2).to(w.dtype) if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class Fp8GradLinear(nn.Module):
    """Stands in for an ``nn.Linear`` while its block tunes: same weight and bias, float8 backward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 operands for the products, as autocast would give nn.Linear.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _Fp8GradLinear.apply(x.to(dtype), self.weight.to(dtype), bias)


@contextmanager
def fp8_grad_linears(block: nn.Module, names):
    """Within the context, the linear layers ``names`` of ``block`` compute their gradients in float8."""
    swapped = {}
    try:
        for name in names:
            parent, _, attr = name.rpartition(".")
            owner = block.get_submodule(parent)
            swapped[name] = (owner, attr, getattr(owner, attr))
            setattr(owner, attr, Fp8GradLinear(swapped[name][2]))
        yield
    finally:
        for owner, attr, linear in swapped.values():
            setattr(owner, attr, linear)
