"""SignRound: tune one block's rounding offsets and clipping ranges with signed gradient descent.

For every linear layer of the block: ``v`` (same shape as the weight) is added before rounding, and
per-group factors ``min_scale``/``max_scale`` in [0, 1] shrink the quantization range. They are tuned so
that the quantized block reproduces the full-precision block's outputs (MSE), with straight-through
rounding, the sign of the gradient as the step, a learning rate decayed linearly to 0, and the
best-loss parameters kept. ``iters == 0`` is plain round-to-nearest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from quantize.model import UserError, block_output
from quantize.numerics import dequantize, fake_quantize, quantize_weight, to_groups
from quantize.presets import TuneConfig
from quantize.scheme import Scheme

log = logging.getLogger(__name__)

# Blocks with fewer weights than this tune faster eagerly: compiling takes seconds per layer shape, and
# small layers are bound by kernel launches either way (a 7B block holds about 2e8 weights).
COMPILE_MIN_WEIGHTS = 1 << 24


def _qdq(w: torch.Tensor, v, min_scale, max_scale, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Tuned quantize-dequantize of one weight in float32, returned in the weight's dtype."""
    return fake_quantize(w, bits, group_size, sym, v, min_scale, max_scale).to(w.dtype)


_compiled_qdq = None


def _get_qdq(compiled: bool):
    """``_qdq``, or its compiled form: one fused kernel forward and one backward per layer shape, where
    eager mode launches about 15 elementwise kernels each way, each a pass over the float32 weight."""
    global _compiled_qdq
    if not compiled:
        return _qdq
    if _compiled_qdq is None:
        # emulate_precision_casts: keep the float16 rounding of the scales (Inductor drops such round
        # trips by default); with it the compiled function matches eager mode bit for bit (checked on CPU).
        _compiled_qdq = torch.compile(_qdq, dynamic=False, options={"emulate_precision_casts": True})
    return _compiled_qdq


@dataclass
class QuantizedWeight:
    """A layer's final integer form: codes ``[N, K]``, float16 scales and zeros ``[N, G]``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: Scheme

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, dtype)


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]  # by layer name inside the block
    loss_before: float  # RTN weights, on a fixed batch
    loss_after: float  # tuned weights, same batch


class _LayerParams(nn.Module):
    def __init__(self, weight: torch.Tensor, scheme: Scheme, device: torch.device):
        super().__init__()
        groups = to_groups(weight, scheme.group_size).shape[1]
        self.v = nn.Parameter(torch.zeros(weight.shape, device=device))
        self.min_scale = nn.Parameter(torch.ones(weight.shape[0], groups, device=device))
        self.max_scale = nn.Parameter(torch.ones(weight.shape[0], groups, device=device))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def tune_block(
    block: nn.Module,
    layers: dict[str, Scheme],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    block_kwargs: dict,
    cfg: TuneConfig,
    generator: torch.Generator,
) -> BlockResult:
    """Quantize ``layers`` (names inside ``block``) so that ``block(inputs)`` matches ``targets``.

    ``block`` sits on the compute device with its weights in the compute dtype; on return its layers
    hold the dequantized weights, so the caller can run the quantized block right away.
    """
    device = inputs.device
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    modules = dict(block.named_modules())
    weights = {name: modules[name].weight.detach() for name in layers}
    params = {name: _LayerParams(w, layers[name], device) for name, w in weights.items()}
    for p in block.parameters():
        p.requires_grad_(False)
    compiled = cfg.compile
    if compiled is None:
        compiled = device.type == "cuda" and cfg.iters > 0 and sum(w.numel() for w in weights.values()) >= COMPILE_MIN_WEIGHTS
    qdq = _get_qdq(compiled)
    if compiled:
        qdq = _warm_up(qdq, weights, layers, params)

    def qdq_weights(use_tuned: bool) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in weights.items():
            s, p = layers[name], params[name]
            if use_tuned:
                out[f"{name}.weight"] = qdq(w, p.v, p.min_scale, p.max_scale, s.bits, s.group_size, s.sym)
            else:
                out[f"{name}.weight"] = fake_quantize(w, s.bits, s.group_size, s.sym).to(w.dtype)
        return out

    def block_loss(qw: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        with _autocast(device, amp):
            out = block_output(functional_call(block, qw, (inputs[idx],), block_kwargs))
        return torch.nn.functional.mse_loss(out.float(), targets[idx].float())

    probe = torch.arange(min(cfg.batch_size, len(inputs)), device=device)
    with torch.no_grad():
        loss_before = block_loss(qdq_weights(False), probe).item()

    if cfg.iters > 0:
        _signed_descent(params, qdq_weights, block_loss, len(inputs), cfg, generator, device)

    results = {}
    for name, w in weights.items():
        s, p = layers[name], params[name]
        tuned = (p.v, p.min_scale, p.max_scale) if cfg.iters > 0 else (0.0, 1.0, 1.0)
        qw = QuantizedWeight(*quantize_weight(w, s.bits, s.group_size, s.sym, *tuned), scheme=s)
        modules[name].weight.data = qw.dequantize(w.dtype).to(device)
        results[name] = qw
    with torch.no_grad():
        loss_after = block_loss({}, probe).item()
    return BlockResult(results, loss_before, loss_after)


def _warm_up(qdq, weights, layers, params):
    """Compile forward and backward for every layer shape now (backward compiles lazily, inside the first
    step otherwise); if compiling fails, fall back to eager mode rather than fail the run."""
    try:
        for name, w in weights.items():
            s, p = layers[name], params[name]
            qdq(w, p.v, p.min_scale, p.max_scale, s.bits, s.group_size, s.sym).float().sum().backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same
        log.warning("torch.compile of the quantize-dequantize failed (%s: %s); tuning eagerly", type(e).__name__, e)
        qdq = _qdq
    for p in params.values():
        for t in p.parameters():
            t.grad = None
    return qdq


def _signed_descent(params, qdq_weights, block_loss, nsamples, cfg: TuneConfig, generator, device) -> None:
    """Signed gradient descent; leaves ``params`` at the values with the lowest training loss seen."""
    groups = [
        ([p.v for p in params.values()], cfg.learning_rate),
        ([t for p in params.values() for t in (p.min_scale, p.max_scale)], cfg.minmax_learning_rate if cfg.minmax_tuning else 0.0),
    ]
    best_loss, best = float("inf"), None
    pick = cfg.batch_size * cfg.grad_accum
    for step in range(cfg.iters):
        order = torch.randperm(nsamples, generator=generator)[:pick].to(device)
        total = 0.0
        for idx in order.split(cfg.batch_size):
            loss = block_loss(qdq_weights(True), idx) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        if total < best_loss:
            best_loss = total
            best = {n: {k: t.detach().clone() for k, t in p.state_dict().items()} for n, p in params.items()}
        decay = 1.0 - step / cfg.iters
        with torch.no_grad():
            for tensors, lr in groups:
                for t in tensors:
                    if t.grad is not None:
                        t.add_(torch.sign(t.grad), alpha=-lr * decay)
                        t.grad = None
            for p in params.values():
                p.min_scale.clamp_(0.0, 1.0)
                p.max_scale.clamp_(0.0, 1.0)
    if best is None:
        raise UserError("the tuning loss was NaN at every step: try --amp off (float32) or a lower --lr")
    for name, p in params.items():
        p.load_state_dict(best[name])
