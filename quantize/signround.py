"""SignRound: tune one block's rounding offsets and clipping ranges with signed gradient descent.

For every linear layer of the block: ``v`` (same shape as the weight) is added before rounding, and
per-group factors ``min_scale``/``max_scale`` in [0, 1] shrink the quantization range. They are tuned so
that the quantized block reproduces the full-precision block's outputs (MSE), with straight-through
rounding, the sign of the gradient as the step, a learning rate decayed linearly to 0, and the
best-loss parameters kept. ``iters == 0`` is plain round-to-nearest.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.func import functional_call

from quantize import act_quant, distributed, fp8_grads, weight_rules
from quantize.model import UserError, block_output, uses_amp
from quantize.moe import expert_stacks, has_routed_experts
from quantize.numerics import dequantize
from quantize.presets import TuneConfig
from quantize.scheme import Scheme

log = logging.getLogger(__name__)

# Blocks with fewer weights than this tune faster eagerly: compiling takes tens of seconds per block shape,
# and small blocks are bound by kernel launches either way (a 7B block holds about 2e8 weights).
COMPILE_MIN_WEIGHTS = 1 << 24
# On the CPU, compiling the tuning step costs ~18 s per block shape and saves ~30 ms per step (SmolLM2-135M
# blocks, bf16 autocast, 2-core AMX Xeon: 4.55 -> 2.95 s per 50-step block): worth it from ~600 steps in all.
CPU_COMPILE_MIN_STEPS = 600

# Devices where a MoE layer's experts tune as one stacked weight per projection (quantize.moe.expert_stacks).
# CUDA: a 128-expert block's step was bound by launching ~10 small kernels per expert and layer. Not the CPU:
# there the stacked quantize-dequantize passes stream tens of MB where each expert's fit in cache (64 experts,
# 512x256: 17.3 -> 24.3 s eager, 32.1 -> 44.3 s compiled, per 20/40-step block on a 2-core EPYC).
STACKS_EXPERTS_ON = {"cuda"}


def compiles(cfg: TuneConfig, device: torch.device, block: nn.Module, block_weights: int) -> bool:
    """Whether a block's whole tuning step and forward passes run compiled (``cfg.compile``, None = the size
    rule on CUDA; on the CPU settle_compile decides first). Never a block with routed experts: its loop
    over the experts the router picked has data-dependent shapes, which break the graph at every expert
    and recompile for every token count; :func:`compiles_layers` compiles its parts instead."""
    if has_routed_experts(block):
        return False
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and cfg.iters > 0 and block_weights >= COMPILE_MIN_WEIGHTS


def compiles_layers(cfg: TuneConfig, device: torch.device, block: nn.Module) -> bool:
    """Whether a block with routed experts runs each layer's quantize-dequantize compiled (the block itself
    eager): wherever compiling is wanted (``cfg.compile`` True, or None on CUDA). One graph per weight shape
    serves every expert; on a 64-expert block on the CPU it halved the step (0.84 -> 0.44 s), after ~16 s
    of compiling."""
    if not has_routed_experts(block) or cfg.iters == 0 or cfg.compile is False:
        return False
    return bool(cfg.compile) or device.type == "cuda"


def settle_compile(cfg: TuneConfig, device: torch.device, blocks: list[nn.Module]) -> TuneConfig:
    """On the CPU, ``compile=None`` becomes a decision for the whole run: one compiled graph serves every
    block of a shape (every expert of a shape, in blocks with routed experts), so it pays once the run has
    enough steps to share its cost."""
    if cfg.compile is not None or device.type != "cpu":
        return cfg
    return replace(cfg, compile=cfg.iters * len(blocks) >= CPU_COMPILE_MIN_STEPS)


def _forward(block, x, block_kwargs) -> torch.Tensor:
    return block_output(block(x, **block_kwargs))


@functools.cache
def _compiled(fn):
    # emulate_precision_casts: keep the float16 rounding of the scales (Inductor drops such round trips by
    # default), so the compiled quantize-dequantize equals eager mode's.
    return torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})


@functools.cache
def _compiled_forward():
    """The compiled forward, which turns into the eager one (with a warning) the first time compiling fails."""
    compiled = _compiled(_forward)

    def forward(block, x, block_kwargs):
        nonlocal compiled
        if compiled is not None:
            try:
                return compiled(block, x, block_kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager forward computes the same
                log.warning("torch.compile of the block's forward failed (%s: %s); running it eagerly", type(e).__name__, e)
                compiled = None
        return _forward(block, x, block_kwargs)

    return forward


def block_forward(compiled: bool):
    """The block's plain forward, or its compiled form (fused norms, rotary and activations)."""
    return _compiled_forward() if compiled else _forward


def _qdq(w: torch.Tensor, v, min_scale, max_scale, scheme: Scheme, ctx: dict) -> torch.Tensor:
    """Tuned quantize-dequantize of one weight in float32 (the scheme's rule: quantize.weight_rules),
    returned in the weight's dtype."""
    return weight_rules.fake_quantize(w, scheme, v, min_scale, max_scale, ctx).to(w.dtype)


def _tuned_loss(block, weights, params, schemes, stacks, x, y, block_kwargs, amp: bool, qdq=_qdq) -> torch.Tensor:
    """MSE between ``y`` and the block's output on ``x`` with every tuned layer quantize-dequantized.

    ``weights`` are keyed by layer name, or by a stack's name for the experts' weights tuned as one
    (``stacks``: stack -> layer names, :func:`quantize.moe.expert_stacks`), whose rows are handed back
    to the layers as views. A plain function of its arguments (no closure), so one compiled graph serves
    every block of a shape: dynamo guards on tensor shapes and the layer names, not on which block or
    tensors it is given.
    """
    qw = {}
    for n, w in weights.items():
        q = qdq(w, *params[n], *schemes[n])
        members = stacks.get(n)
        if members is None:
            qw[f"{n}.weight"] = q
        else:
            qw.update(zip([f"{m}.weight" for m in members], q.view(len(members), -1, q.shape[-1]).unbind(0)))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = block_output(functional_call(block, qw, (x,), block_kwargs))
    return torch.nn.functional.mse_loss(out.float(), y.float())


def tuning_loss(compiled: bool | str):
    """``_tuned_loss``; compiled (True): the quantize-dequantize of all layers and the block's forward and
    backward as fused kernels (eager mode spent a third of a 7B block's step in elementwise kernels: norms,
    rotary, SiLU, dtype copies, each a pass over the activations); ``"layers"``: only each layer's
    quantize-dequantize compiled, for blocks whose forward cannot be one graph (routed experts)."""
    if compiled == "layers":
        return functools.partial(_tuned_loss, qdq=_compiled(_qdq))
    return _compiled(_tuned_loss) if compiled else _tuned_loss


@dataclass
class QuantizedWeight:
    """A layer's final form. Integer weight-only schemes: codes ``[N, K]``, float16 scales and zeros ``[N, G]``;
    the other schemes: the forms ``quantize.weight_rules`` lists (zeros empty), and in ``extra`` the float32
    tensors fixed for the layer (NVFP4 ``weight_global_scale``; calibrated ``input_global_scale`` or
    ``input_scale`` of static activations)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: Scheme
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scheme.integer_weight_only:
            return dequantize(self.q, self.scales, self.zeros, dtype)
        return weight_rules.dequantize(self.q, self.scales, self.zeros, self.extra, self.scheme, dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.q.to(device), self.scales.to(device), self.zeros.to(device), self.scheme,
                               {k: t.to(device) for k, t in self.extra.items()})


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]  # by layer name inside the block
    loss_before: float  # RTN weights, on a fixed batch
    loss_after: float  # tuned weights, same batch


class _LayerParams(nn.Module):
    def __init__(self, weight: torch.Tensor, scheme: Scheme, device: torch.device, clip: torch.Tensor | None = None):
        super().__init__()
        shape = weight_rules.clip_shape(scheme, *weight.shape)
        self.v = nn.Parameter(torch.zeros(weight.shape, device=device))
        start = torch.ones(shape, device=device) if clip is None else clip.to(device)
        self.min_scale = nn.Parameter(start.clone())
        self.max_scale = nn.Parameter(start.clone())


def _clip_error(w, wf, imp, factor, scheme: Scheme, ctx) -> torch.Tensor:
    """Importance-weighted squared rounding error per group ``[N, G]`` with the range factors ``factor``."""
    err = (wf - weight_rules.fake_quantize(w, scheme, 0.0, factor, factor, ctx)).reshape(*factor.shape, -1)
    return (imp * err.square()).sum(-1)


@functools.cache
def _compiled_clip_error():
    # One pass over the weights per grid point instead of ~20 eager ones: SmolLM2-135M W3 g64 on a 2-core AMX
    # Xeon, 29 grid points, a 1536x576 layer 100-320 ms eager, 18.5 ms compiled; the block's search 0.27 ->
    # 0.08 s of a ~2.4 s block. One graph per layer shape: with dynamic shapes Inductor's kernel ran 10x
    # slower than eager.
    return torch.compile(_clip_error, dynamic=False, options={"emulate_precision_casts": True})


@torch.no_grad()
def search_clip(w: torch.Tensor, scheme: Scheme, importance: torch.Tensor, ctx: dict | None = None,
                compiled: bool = False) -> torch.Tensor:
    """Per-group clipping factor ``[N, G]`` from the rule's search grid that minimises the round-to-nearest
    error weighted by each input channel's importance (``importance [K]``: mean squared activation);
    ``compiled``: each grid point's error as one compiled pass (the same rule; sums in another order)."""
    n, k = w.shape
    g = weight_rules.clip_shape(scheme, n, k)[-1]
    wf = w.float()
    imp = importance.float().expand(n, k).reshape(n, g, k // g)
    best_err = torch.full((n, g), float("inf"), device=w.device)
    best = torch.ones((n, g), device=w.device)
    errors = _compiled_clip_error() if compiled else _clip_error
    for factor in weight_rules.search_candidates(w, scheme, ctx):
        err = errors(w, wf, imp, factor, scheme, ctx)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, factor, best)
    return best


def searched_layers(cfg: TuneConfig, layers: dict[str, Scheme]) -> list[str]:
    """Layers whose clipping factors come from :func:`search_clip`: with ``init_clip`` on, every layer whose
    rule has a search grid (at iters 0 that is AutoRound's "optimized RTN"); by default, tuning starts 2-
    and 3-bit integer weight-only layers from it and iters 0 is plain round-to-nearest."""
    if cfg.init_clip is True:
        return [n for n, s in layers.items() if weight_rules.search_grid(s) is not None]
    if cfg.init_clip is None and cfg.iters > 0:
        return [n for n, s in layers.items() if s.bits <= 3 and s.integer_weight_only]
    return []


def _searched_clips(block, layers, weights, contexts, names, inputs, block_kwargs, batch, amp, out=None,
                    compiled: bool = False) -> dict[str, torch.Tensor]:
    if not names:
        return {}
    energy = _input_energy(block, names, inputs, block_kwargs, batch, amp, out)
    # A layer no input reached (a MoE expert calibration never routes to) keeps the full range.
    return {n: search_clip(weights[n], layers[n], energy[n], contexts[n], compiled) for n in names if n in energy}


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
    amp = uses_amp(cfg.amp, device)
    modules = dict(block.named_modules())
    weights = {name: modules[name].weight.detach() for name in layers}
    # What each rule fixes before tuning (NVFP4's global scale, fused shards sharing one); static activation
    # scales calibrated on the tuning inputs; the input fake-quantization, which stays on the block's layers
    # once tuned, so the quantized block computes as a served checkpoint does (quantize.act_quant).
    contexts = act_quant.weight_contexts(weights, layers)
    schemes = {name: (s, contexts[name]) for name, s in layers.items()}
    for p in block.parameters():
        p.requires_grad_(False)
    static = act_quant.calibrate(block, layers, inputs, block_kwargs, cfg.batch_size, amp)
    act_quant.install_all(block, {n: act_quant.quantizer(s, static.get(n)) for n, s in layers.items()})

    def final(key: str, *tuned_params) -> "QuantizedWeight":
        scheme, ctx = schemes[key]
        q, scales, zeros, extra = weight_rules.quantize_weight(tuned[key], scheme, *tuned_params, ctx=ctx)
        return QuantizedWeight(q, scales, zeros, scheme, {**extra, **static.get(key, {})})

    def probe_loss(qw: dict[str, torch.Tensor], idx: torch.Tensor) -> float:
        with torch.no_grad(), _autocast(device, amp):
            out = block_output(functional_call(block, qw, (inputs[idx],), block_kwargs))
        return torch.nn.functional.mse_loss(out.float(), targets[idx].float()).item()

    probe = torch.arange(min(cfg.batch_size, len(inputs)), device=device)
    rtn = {f"{n}.weight": weight_rules.fake_quantize(w, schemes[n][0], ctx=schemes[n][1]).to(w.dtype) for n, w in weights.items()}
    loss_before = probe_loss(rtn, probe)
    del rtn

    clips = _searched_clips(block, layers, weights, contexts, searched_layers(cfg, layers), inputs, block_kwargs,
                            cfg.batch_size, amp, compiled=bool(cfg.compile) and device.type == "cpu")
    stacks = expert_stacks(block, layers, weight_rules.row_local) if cfg.iters > 0 and device.type in STACKS_EXPERTS_ON else {}
    tuned = _stack_experts(stacks, weights, schemes, clips, modules)
    params = {key: _LayerParams(w, schemes[key][0], device, clips.get(key)) for key, w in tuned.items()} if cfg.iters > 0 else {}
    # The best step's parameters, copied into buffers allocated once and quantized once at the end, as
    # AutoRound keeps its best parameters: quantizing every layer at each new low took 6.8% of a block's
    # descent on the CPU (reference model, 100 steps, 34 new lows: 2.57 s; the copies take 0.22 s).
    tuned_tensors = [t for p in params.values() for t in (p.v, p.min_scale, p.max_scale)]
    snapshot = [torch.empty_like(t) for t in tuned_tensors]

    def keep_best() -> None:
        torch._foreach_copy_(snapshot, tuned_tensors)

    if params:
        compiled = compiles(cfg, device, block, sum(w.numel() for w in weights.values()))
        args = (block, tuned, {n: (p.v, p.min_scale, p.max_scale) for n, p in params.items()}, schemes, stacks)

        def loss_with(fn):
            return lambda idx: fn(*args, inputs[idx], targets[idx], block_kwargs, amp)

        if cfg.fp8_grads and device.type == "cuda" and not fp8_grads.supported(device):
            raise UserError("float8 gradients need a GPU of compute capability 8.9 or newer (Ada, Hopper): drop --fp8-grads")
        with fp8_grads.fp8_grad_linears(block, layers) if cfg.fp8_grads else nullcontext():
            loss = loss_with(tuning_loss(False))
            if compiled or compiles_layers(cfg, device, block):
                loss = _warm_up(loss_with(tuning_loss(True if compiled else "layers")), loss, probe, params)
            _signed_descent(params, loss, len(inputs), cfg, generator, device, keep_best)
        best = {key: final(key, *snapshot[3 * i : 3 * i + 3]) for i, key in enumerate(params)}
        del snapshot
    else:
        best = {n: final(n, 0.0, clips[n], clips[n]) if n in clips else final(n) for n in weights}

    best = _unstack(best, stacks, static)
    for name, qw in best.items():
        modules[name].weight.data = qw.dequantize(weights[name].dtype)
    return BlockResult(best, loss_before, probe_loss({}, probe))


def _stack_experts(stacks, weights, schemes, clips, modules) -> dict[str, torch.Tensor]:
    """The weights tuning quantizes, by layer or stack name: each stack's layers' weights concatenated along
    the rows, and those layers' weights (in ``weights`` and in the block) made views of its rows, so the
    block holds one copy. ``schemes`` and ``clips`` get the stack's entries."""
    tuned = dict(weights)
    for key, names in stacks.items():
        stacked = torch.cat([tuned.pop(n) for n in names])
        rows = stacked.view(len(names), -1, stacked.shape[-1])
        for i, n in enumerate(names):
            modules[n].weight.data = weights[n] = rows[i]
        tuned[key] = stacked
        schemes[key] = schemes[names[0]]
        if any(n in clips for n in names):  # an expert no input reached was not searched: full range
            full = torch.ones(weight_rules.clip_shape(schemes[key][0], *rows[0].shape), device=stacked.device)
            clips[key] = torch.cat([clips.pop(n, full) for n in names])
    return tuned


def _unstack(best: dict[str, QuantizedWeight], stacks, static) -> dict[str, QuantizedWeight]:
    """Final forms by layer: a stack's rows split back to its layers (row-local rules: nothing per tensor),
    each layer's tensors its own copy (safetensors refuses shared storage)."""
    out = {}
    for key, qw in best.items():
        names = stacks.get(key)
        if names is None:
            out[key] = qw
            continue
        parts = [t.chunk(len(names)) if t.numel() else [t] * len(names) for t in (qw.q, qw.scales, qw.zeros)]
        for name, q, scales, zeros in zip(names, *parts):
            out[name] = QuantizedWeight(q.clone(), scales.clone(), zeros.clone(), qw.scheme, {**qw.extra, **static.get(name, {})})
    return out


@torch.no_grad()
def round_block(block: nn.Module, layers: dict[str, Scheme], inputs: torch.Tensor | None = None, block_kwargs: dict | None = None,
                batch: int = 1, amp: bool = False, searched: list[str] = (), outputs: torch.Tensor | None = None
                ) -> dict[str, "QuantizedWeight"]:
    """``iters 0``: every layer rounded to nearest, with no pass beyond what static activation scales and
    the clipping search of the ``searched`` layers need (one over ``inputs``, before rounding, as
    :func:`tune_block` calibrates and searches). The same codes and scales as :func:`tune_block` at
    ``iters 0``, without its logged losses. The block then holds the dequantized weights and its layers'
    input quantization, as after tuning. ``outputs`` (with ``searched``) receives the unrounded block's
    outputs from the search pass."""
    modules = dict(block.named_modules())
    weights = {name: modules[name].weight.detach() for name in layers}
    contexts = act_quant.weight_contexts(weights, layers)  # NVFP4: fused shards share one global scale
    static = act_quant.calibrate(block, layers, inputs, block_kwargs or {}, batch, amp) if inputs is not None else {}
    # installed before the search, as tune_block does: the search weighs the inputs the layers will see
    act_quant.install_all(block, {n: act_quant.quantizer(s, static.get(n)) for n, s in layers.items()})
    clips = _searched_clips(block, layers, weights, contexts, list(searched), inputs, block_kwargs or {}, batch, amp, outputs)
    out = {}
    for name, scheme in layers.items():
        clip = clips.get(name, 1.0)
        q, scales, zeros, extra = weight_rules.quantize_weight(weights[name], scheme, 0.0, clip, clip, ctx=contexts[name])
        out[name] = QuantizedWeight(q, scales, zeros, scheme, {**extra, **static.get(name, {})})
        modules[name].weight.data = out[name].dequantize(weights[name].dtype)
    return out


@torch.no_grad()
def _input_energy(block, layers, inputs, block_kwargs, batch: int, amp: bool, out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input channel ``[K]`` of each layer, over all of ``inputs``; the
    block's outputs go to ``out`` when given (which may be ``inputs``: each batch is consumed first)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
        return record

    handles = [block.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        with _autocast(inputs.device, amp):
            for i, x in enumerate(inputs.split(batch)):
                y = block(x, **block_kwargs)
                if out is not None:
                    out[i * batch : i * batch + len(x)].copy_(block_output(y))
    finally:
        for h in handles:
            h.remove()
    tokens = inputs.shape[0] * inputs.shape[1]
    return {name: s / tokens for name, s in sums.items()}


def _warm_up(compiled_loss, eager_loss, probe, params):
    """Compile forward and backward now (backward compiles lazily inside the first step otherwise); if
    compiling fails, fall back to eager mode rather than fail the run."""
    try:
        compiled_loss(probe).backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same
        log.warning("torch.compile of the block's tuning step failed (%s: %s); tuning eagerly", type(e).__name__, e)
        compiled_loss = eager_loss
    for p in params.values():
        for t in p.parameters():
            t.grad = None
    return compiled_loss


def sample_batches(nsamples: int, size: int, generator: torch.Generator):
    """Batches of ``size`` sample indices, walking through a shuffled order of all ``nsamples`` and
    reshuffling when fewer than ``size`` remain (the tail is dropped), as AutoRound samples: every sample
    is seen once per pass, where drawing each batch afresh leaves some out for many steps."""
    if size > nsamples:  # no batch could ever be drawn (TuneConfig refuses this; guard against a silent hang)
        raise ValueError(f"a batch of {size} samples cannot be drawn from {nsamples}")
    while True:
        order = torch.randperm(nsamples, generator=generator)
        yield from order[: nsamples - nsamples % size].split(size)


def _signed_descent(params, loss, nsamples, cfg: TuneConfig, generator, device, keep_best) -> None:
    """Signed gradient descent; calls ``keep_best`` whenever the training loss reaches a new low."""
    groups = [
        ([p.v for p in params.values()], cfg.learning_rate),
        ([t for p in params.values() for t in (p.min_scale, p.max_scale)], cfg.minmax_learning_rate if cfg.minmax_tuning else 0.0),
    ]
    best_loss = float("inf")
    pick = cfg.batch_size * cfg.grad_accum
    team = distributed.current()  # several processes: each takes its share of every batch (quantize.distributed)
    tuned = [t for group, _ in groups for t in group]
    batches = sample_batches(nsamples, pick, generator)
    for step in range(cfg.iters):
        order = next(batches).to(device)
        total = 0.0
        for idx in order.split(cfg.batch_size):
            batch_loss = loss(team.share(idx)) / (cfg.grad_accum * team.size)
            batch_loss.backward()
            total += batch_loss.item()
        total = team.sum(total, device)
        team.sum_grads(tuned)
        if total < best_loss:
            best_loss = total
            keep_best()
        decay = 1.0 - step / cfg.iters
        with torch.no_grad():
            for group, lr in groups:
                live = [t for t in group if t.grad is not None]
                if live and lr > 0:
                    # One pass to take signs in place and one to step: foreach kernels, not two per tensor.
                    grads = [t.grad for t in live]
                    torch._foreach_sign_(grads)
                    torch._foreach_add_(live, grads, alpha=-lr * decay)
                for t in group:
                    t.grad = None
            for p in params.values():
                p.min_scale.clamp_(0.0, 1.0)
                p.max_scale.clamp_(0.0, 1.0)
    if best_loss == float("inf"):
        raise UserError("the tuning loss was NaN at every step: try --amp off (float32) or a lower --lr")
