"""quantize.numerics against a readable, loop-based reference of AutoRound's rules."""

import pytest
import torch

from quantize.numerics import dequantize, fake_quantize, quantize_weight


def reference(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """One group at a time, scalars only: the rules as written in the module docstring."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    q = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // g, dtype=torch.float16)
    zeros = torch.zeros(n, k // g, dtype=torch.uint8)
    for r in range(n):
        for j in range(k // g):
            grp = w[r, j * g : (j + 1) * g].double()
            lo, hi = min(grp.min().item(), 0.0), max(grp.max().item(), 0.0)
            if sym:
                extreme = lo if -lo > hi else hi
                s = float(torch.tensor(-extreme / 2 ** (bits - 1)).half())
                s = -max(-s, 1e-5) if s < 0 else max(s, 1e-5)
                z = 2 ** (bits - 1)
            else:
                s = max(float(torch.tensor((hi - lo) / (2**bits - 1)).half()), 1e-5)
                z = round(-lo / s)
            for c in range(g):
                code = round(grp[c].item() / s) + z
                q[r, j * g + c] = min(max(code, 0), 2**bits - 1)
            scales[r, j], zeros[r, j] = s, z
    return q, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_matches_reference(bits, sym, group_size):
    torch.manual_seed(bits * 10 + sym)
    w = torch.randn(6, 64) * 0.05
    q, s, z = quantize_weight(w, bits, group_size, sym)
    rq, rs, rz = reference(w, bits, group_size, sym)
    assert torch.equal(s, rs) and torch.equal(z, rz)
    # float32 vs float64 division may flip a code sitting exactly on .5; nothing else may differ
    assert (q.int() - rq.int()).abs().max() <= 1
    assert (q != rq).float().mean() < 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_fake_quantize_equals_dequantized_codes(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 256)
    fq = fake_quantize(w, bits, 128, sym)
    assert torch.equal(fq, dequantize(*quantize_weight(w, bits, 128, sym)))


def test_sym_uses_full_range_and_maps_extreme_exactly():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0] * 8])
    q, s, z = quantize_weight(w, 4, 32, sym=True)
    assert int(z[0, 0]) == 8 and q.min() == 0  # the extreme -1.0 lands on code 0
    assert dequantize(q, s, z)[0, 0].item() == pytest.approx(-1.0, abs=1e-3)
    w_pos = -w  # extreme positive: negative scale, still code 0
    q2, s2, _ = quantize_weight(w_pos, 4, 32, sym=True)
    assert s2[0, 0] < 0 and q2[0, 0] == 0


def test_gradients_reach_tuned_parameters():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    v = torch.zeros_like(w, requires_grad=True)
    lo = torch.ones(8, 2, requires_grad=True)
    hi = torch.ones(8, 2, requires_grad=True)
    for sym in (True, False):
        loss = (fake_quantize(w, 3, 32, sym, v, lo, hi) - w).pow(2).sum()
        loss.backward()
        assert v.grad.abs().sum() > 0 and hi.grad.abs().sum() > 0
        v.grad = lo.grad = hi.grad = None


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_weight(torch.randn(4, 96), 4, 64, True)


def test_constant_group_stays_finite():
    q, s, z = quantize_weight(torch.zeros(2, 32), 4, 32, sym=False)
    assert torch.isfinite(dequantize(q, s, z)).all() and (dequantize(q, s, z) == 0).all()
