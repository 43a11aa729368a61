"""AutoScheme: one scheme per layer, chosen so that the model's average bits meet a target at the least
estimated loss (``python -m quantize MODEL --schemes W2A16,W4A16 --bits 3``).

Three steps, each usable on its own:

1. **Bit accounting** (:func:`layer_bits`, :func:`average_bits`): what a layer costs under a scheme. One
   function counts everywhere (the range check, the allocation, the summary), so the plan's average is
   exactly the average that is reported and checked.
2. **Scores** (:func:`score_options`): for every option, the whole model is quantized to that option by
   round-to-nearest (the project's numerics), the calibration text runs through it, and each layer gets
   ``|sum dL/dQ(W) * (W - Q(W))|``: the first-order Taylor estimate of the loss change from restoring that
   layer, taken at the quantized weights, its absolute value summed over calibration batches. AutoRound
   sums ``|dL/dQ * (W - Q)|`` weight by weight, which counts the errors that cancel within a layer as
   damage; the signed sum picked better plans at every budget tried (reference model, RTN, 100 held-out
   windows: W2/W4 at 2.5 bits 120.8 vs 125.4 perplexity, at 3 bits 84.6 vs 93.6, at 3.5 bits 65.5 vs 70.2;
   W3/W4 at 3.5 bits 57.8 vs 59.0).
   Gradients are taken only on the linear weights, block by block (see :func:`score_options` for memory).
3. **Allocation** (:func:`allocate`): exact dynamic programming over cumulative bits (a Pareto front of
   (bits, score) states), minimum total score within the budget. Layers that serving engines fuse (q/k/v,
   gate/up: :mod:`quantize.export.fused`) are one unit and get one scheme; layers the user pins with
   ``layer_config`` (or ``ignore``) are fixed and their bits leave the budget.

:func:`choose_schemes` runs all three on a model and returns an :class:`AutoSchemePlan`, whose
``layer_config`` the existing planner (:func:`quantize.layer_config.plan_layers`) consumes unchanged::

    model, tok = load_model(path); blocks = find_blocks(model)
    plan = choose_schemes(model, blocks, "W2A16,W4A16", 3.0, calibration_ids("bundled", tok, 16, 256))
    print(plan.summary())
    layers = plan_layers(model, blocks.prefix, plan.base_scheme, plan.layer_config, layout_for=layout_for)
    result = quantize_model(model, blocks, layers, calib_ids, tune_config, device)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from quantize.export.fused import fused_groups
from quantize.layer_config import KEEP_BITS
from quantize.model import Blocks, UserError, block_output, capture_block_inputs, compute_dtype, final_norm
from quantize.numerics import fake_quantize
from quantize.packing import layout_fits
from quantize.scheme import SCHEMES, Scheme, get_scheme, match_name

SCALE_BITS = 16  # scales are stored as float16 (quantize.numerics.SCALE_DTYPE)
SIXTEEN = "BF16"  # the option name of "keep this layer 16-bit"; FP16 and W16A16 are accepted spellings
_SIXTEEN_SPELLINGS = {"BF16", "FP16", "W16A16", "16"}
# AutoRound's scoring defaults: 16 samples of 256 tokens.
SCORE_NSAMPLES = 16
SCORE_SEQLEN = 256
SCORE_BATCH = 4

Option = Scheme | None  # None: the layer stays 16-bit


# --------------------------------------------------------------------------------------------------------
# 1. bit accounting


def layer_bits(out_features: int, in_features: int, scheme: Option, ignore_scale_zp_bits: bool = False) -> int:
    """Bits one linear layer's weight costs under ``scheme`` (None: 16-bit).

    What counts: ``bits * n`` for the ``n = out * in`` weights, plus per group a 16-bit scale (float16, as
    stored) and, for asymmetric schemes only, a ``bits``-wide zero point. Symmetric schemes count no zero
    point: it is the constant ``2**(bits-1)`` and carries no information (the GPTQ layout stores it anyway,
    as one packed ``qzeros`` tensor; Intel's AutoRound counts ``bits`` per group for it, so its averages for
    sym schemes are higher by ``bits / group_size``). Groups are ``out * in / group_size``, or ``out`` for
    per-channel (``group_size -1``). A 16-bit layer costs ``16 * n``. Biases, norms and embeddings are not
    counted. ``ignore_scale_zp_bits``: count only ``bits * n`` (AutoRound's option of that name).
    Examples: W4A16 (g128, sym) 4.125 bits per weight, W3A16 3.125, W2A16 2.125, W2A16G64 asym 2.28125.
    """
    n = out_features * in_features
    if scheme is None:
        return KEEP_BITS * n
    if ignore_scale_zp_bits:
        return scheme.bits * n
    groups = out_features * (1 if scheme.group_size == -1 else in_features // scheme.group_size)
    zero_bits = 0 if scheme.sym else scheme.bits
    return scheme.bits * n + groups * (SCALE_BITS + zero_bits)


def average_bits(
    shapes: dict[str, tuple[int, int]], schemes: dict[str, Option], ignore_scale_zp_bits: bool = False
) -> float:
    """Average bits per weight over the layers in ``shapes`` (name -> (out, in)); ``schemes`` maps each to
    its scheme (None or missing: 16-bit)."""
    total = sum(layer_bits(o, i, schemes.get(name), ignore_scale_zp_bits) for name, (o, i) in shapes.items())
    return total / sum(o * i for o, i in shapes.values())


def option_name(option: Option) -> str:
    return SIXTEEN if option is None else option.name


def parse_options(spec, group_size: int | None = None, sym: bool | None = None) -> list[Option]:
    """Options from ``"W2A16,W4A16"`` (or a list of names / Schemes); ``BF16`` (also FP16, W16A16) keeps a
    layer 16-bit. ``group_size``/``sym`` override every integer option. Duplicates are dropped; the order
    is by cost (bits, then smaller groups last)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s != ""]
    if not items:
        raise UserError("--schemes is empty: give the options to choose from, e.g. --schemes W2A16,W4A16")
    options: list[Option] = []
    for item in items:
        if item is None or (isinstance(item, str) and item.upper() in _SIXTEEN_SPELLINGS):
            option = None
        elif isinstance(item, Scheme):
            option = replace(item, **{k: v for k, v in (("group_size", group_size), ("sym", sym)) if v is not None})
        else:
            try:
                option = get_scheme(item, group_size=group_size, sym=sym)
            except ValueError as e:
                raise UserError(
                    f"unknown option {item!r} in --schemes: choose from {', '.join(SCHEMES)} or {SIXTEEN} (keep 16-bit)"
                ) from e
        if option not in options:
            options.append(option)
    return sorted(options, key=lambda o: layer_bits(1, 4096, o) / 4096)


# --------------------------------------------------------------------------------------------------------
# 3. allocation


@dataclass
class Unit:
    """Layers that get one scheme together (a fused group, or one layer) and what each option costs them."""

    name: str
    layers: list[str]
    options: list[Option]  # available options
    bits: list[int]  # cost of each available option, summed over the unit's layers
    scores: list[float]  # estimated loss of each available option, summed over the unit's layers


def allocate(units: list[Unit], budget: int) -> tuple[list[int], float]:
    """The option index per unit that minimises the total score with total bits ``<= budget``: exact.

    Dynamic programming over units; the states after each unit are the Pareto front of (cumulative bits,
    total score): a state with more bits and no smaller score than another can never end in a better plan,
    so dropping it keeps the optimum. Costs are divided by their greatest common divisor first (same
    optimum, fewer distinct sums). Ties go to fewer bits. The front is held in arrays (numpy), and only
    the option taken into each state is kept for the way back (the previous state is this one minus that
    option's cost): a 70B-shaped model (320 units, three options) allocates in seconds.
    Raises ValueError when nothing fits.
    """
    if not units:
        return [], 0.0
    g = 0
    for u in units:
        for b in u.bits:
            g = math.gcd(g, b)
    g = g or 1
    cap = budget // g
    front_bits = np.zeros(1, dtype=np.int64)
    front_score = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per unit: (states, option taken into each)
    for u in units:
        cand_bits = np.concatenate([front_bits + b // g for b in u.bits])
        cand_score = np.concatenate([front_score + s for s in u.scores])
        cand_opt = np.repeat(np.arange(len(u.bits), dtype=np.int16), len(front_bits))
        keep = cand_bits <= cap
        cand_bits, cand_score, cand_opt = cand_bits[keep], cand_score[keep], cand_opt[keep]
        if not len(cand_bits):
            raise ValueError("no allocation fits the budget")
        order = np.lexsort((cand_opt, cand_score, cand_bits))  # by bits, then score, then option
        cand_bits, cand_score, cand_opt = cand_bits[order], cand_score[order], cand_opt[order]
        # Pareto front: a state survives only if its score is below every score with fewer or equal bits.
        best_before = np.concatenate(([np.inf], np.minimum.accumulate(cand_score)[:-1]))
        survive = cand_score < best_before
        front_bits, front_score = cand_bits[survive], cand_score[survive]
        back.append((front_bits, cand_opt[survive]))
    i = int(np.argmin(front_score))  # the first minimum: the fewest bits among equal scores
    best_score, state = float(front_score[i]), int(front_bits[i])
    picks = [0] * len(units)
    for j in range(len(units) - 1, -1, -1):
        states, opts = back[j]
        k = int(opts[np.searchsorted(states, state)])
        picks[j] = k
        state -= units[j].bits[k] // g
    return picks, best_score


# --------------------------------------------------------------------------------------------------------
# the layers in scope


@dataclass
class Scope:
    """Which layers the average counts, which are free, which are fixed, and which options each may take."""

    shapes: dict[str, tuple[int, int]]  # every counted layer: name -> (out, in)
    fixed: dict[str, Option] = field(default_factory=dict)  # pinned (layer_config, ignore, fused sibling)
    why_fixed: dict[str, str] = field(default_factory=dict)
    available: dict[str, list[Option]] = field(default_factory=dict)  # free layer -> options it can take
    unavailable: dict[str, dict[str, str]] = field(default_factory=dict)  # layer -> option name -> why not


def _pinned(name: str, layer_config: dict[str, dict], base: Scheme) -> tuple[bool, Option]:
    for pattern, spec in layer_config.items():
        if match_name(pattern, name):
            unknown = set(spec) - {f.name for f in fields(Scheme)}
            if unknown:
                raise UserError(f"layer_config[{pattern!r}] has unknown fields {sorted(unknown)}; allowed: bits, group_size, sym, data_type")
            if spec.get("bits", base.bits) >= KEEP_BITS:
                return True, None
            try:
                return True, replace(base, **spec)
            except ValueError as e:
                raise UserError(f"layer_config[{pattern!r}]: {e}") from e
    return False, None


def _why_not(option: Option, out_f: int, in_f: int, layout_for) -> str | None:
    if option is None:
        return None
    g = option.group_size
    if g != -1 and in_f % g:
        return f"in_features {in_f} is not a multiple of group_size {g}"
    return layout_fits(layout_for(option), option.bits, in_f, out_f) if layout_for else None


def find_scope(
    model: nn.Module,
    blocks: Blocks,
    options: list[Option],
    layer_config: dict[str, dict] | None = None,
    ignore: list[str] | None = None,
    quant_lm_head: bool = False,
    base: Scheme | None = None,
    layout_for=None,
) -> Scope:
    """Every linear layer inside the blocks (and lm_head with ``quant_lm_head``, unless tied to the
    embeddings), as :func:`quantize.layer_config.plan_layers` sees them. Counted in the average: all of
    them, pinned and ignored layers included (ignored ones at 16 bits). Embeddings are never counted and
    lm_head only when it is quantized, as in AutoRound. A ``layer_config`` entry pins the layers it
    matches; fields it leaves out come from ``base`` (``--scheme``, default W4A16)."""
    layer_config = layer_config or {}
    ignore = ignore or []
    base = base or get_scheme("W4A16")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_tied = head is not None and head.weight is model.get_input_embeddings().weight
    scope = Scope(shapes={})
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not (name.startswith(blocks.prefix + ".") or (module is head and quant_lm_head and not head_tied)):
            continue
        out_f, in_f = module.out_features, module.in_features
        scope.shapes[name] = (out_f, in_f)
        if any(match_name(p, name) for p in ignore):
            scope.fixed[name], scope.why_fixed[name] = None, "in the ignore list"
            continue
        pinned, scheme = _pinned(name, layer_config, base)
        if pinned:
            why = _why_not(scheme, out_f, in_f, layout_for)
            scope.fixed[name] = None if why else scheme
            scope.why_fixed[name] = "pinned by layer_config" + (f" (kept 16-bit: {why})" if why else "")
            continue
        ok, bad = [], {}
        for option in options:
            why = _why_not(option, out_f, in_f, layout_for)
            if why:
                bad[option_name(option)] = why
            else:
                ok.append(option)
        if bad:
            scope.unavailable[name] = bad
        if ok:
            scope.available[name] = ok
        else:
            scope.fixed[name], scope.why_fixed[name] = None, "no option fits it (" + "; ".join(f"{k}: {v}" for k, v in bad.items()) + ")"
    # Fused siblings of a pinned layer follow it, so the engine still loads one fused matrix.
    for group in fused_groups(scope.shapes).values():
        pinned = [n for n in group if n in scope.fixed and scope.why_fixed[n].startswith(("pinned", "in the ignore"))]
        if not pinned:
            continue
        target = scope.fixed[pinned[0]]
        for n in group:
            if n in scope.available:
                if _why_not(target, *scope.shapes[n], layout_for) is None:
                    del scope.available[n]
                    scope.fixed[n] = target
                    scope.why_fixed[n] = f"follows its fused sibling {pinned[0]} ({scope.why_fixed[pinned[0]]})"
    return scope


def build_units(scope: Scope, scores: dict[str, dict[str, float]], ignore_scale_zp_bits: bool = False) -> list[Unit]:
    """Free layers as allocation units: fused groups together (options every member can take), others alone."""
    free = list(scope.available)
    units, seen = [], set()
    groups = fused_groups(free)
    for fused, members in sorted(groups.items()):
        members = [m for m in members if m in scope.available]
        common = [o for o in scope.available[members[0]] if all(o in scope.available[m] for m in members)]
        if len(members) > 1 and not common:
            raise UserError(f"the fused layers {', '.join(members)} have no option in common; one option must fit them all")
        units.append(_unit(fused if len(members) > 1 else members[0], members, common, scope, scores, ignore_scale_zp_bits))
        seen.update(members)
    for name in free:
        if name not in seen:
            units.append(_unit(name, [name], scope.available[name], scope, scores, ignore_scale_zp_bits))
    order = {n: i for i, n in enumerate(scope.shapes)}
    return sorted(units, key=lambda u: order[u.layers[0]])


def _unit(name, members, options, scope, scores, ignore_scale_zp_bits) -> Unit:
    bits = [sum(layer_bits(*scope.shapes[m], o, ignore_scale_zp_bits) for m in members) for o in options]
    sc = [sum(scores.get(m, {}).get(option_name(o), 0.0) for m in members) for o in options]
    return Unit(name, members, options, bits, sc)


# --------------------------------------------------------------------------------------------------------
# 2. scores


def _head_modules(model: nn.Module, blocks: Blocks) -> tuple[nn.Module | None, nn.Module]:
    """The final norm after the blocks and the output projection (lm_head)."""
    parent = model.get_submodule(blocks.prefix.rpartition(".")[0]) if "." in blocks.prefix else model
    norm = final_norm(model, blocks)
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"AutoScheme needs the model's output projection; {type(model).__name__} has none")
    if norm is None and getattr(parent, "project_out", None) is not None:
        raise UserError(f"AutoScheme does not know the head of {type(model).__name__} (a final projection after the blocks)")
    return norm, head


def _quantized(weight: torch.Tensor, option: Option) -> torch.Tensor:
    if option is None:
        return weight
    with torch.no_grad():
        return fake_quantize(weight, option.bits, option.group_size, option.sym).to(weight.dtype)


def layer_score(grad: torch.Tensor, delta: torch.Tensor) -> float:
    """One batch's estimate of the loss change from restoring a layer, ``|sum g * (W - Q(W))|`` (the module
    docstring says why the sign is kept inside the sum), in float32."""
    return (grad.float() * delta.float()).sum().abs().item()


@dataclass
class Scores:
    per_layer: dict[str, dict[str, float]]  # layer -> option name -> score
    loss: dict[str, float]  # option name -> calibration loss with the whole model at that option
    seconds: float
    method: str = "block-wise"


def score_options(
    model: nn.Module,
    blocks: Blocks,
    scope: Scope,
    options: list[Option],
    calib_ids: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = SCORE_BATCH,
    progress: bool = True,
) -> Scores:
    """Per free layer and option: ``sum over batches of |sum dL/dQ(W) * (W - Q(W))|`` with every free layer
    quantized to that option by round-to-nearest (layers the option cannot hold stay 16-bit), pinned layers
    at their pinned scheme, ``L`` the mean next-token cross-entropy over all calibration tokens.

    Block-wise: the inputs of every block are cached on the host in one forward pass; the loss's gradient
    at the last block's output comes from the head (final norm and lm_head); then each block, last to
    first, is run again on its cached inputs, one batch at a time, and backpropagated, giving the gradient
    of its quantized weights (the only parameters that require it) and of its inputs, which feeds the block
    before. Memory: one block in the compute dtype, the activations of one batch through one block (or the
    head's logits), the cached inputs (blocks x samples x tokens x hidden on the host) and one gradient of
    that size. Cost per option: about four forward passes over the calibration set.
    """
    device = torch.device(device)
    start = time.time()
    model_dtype = next(blocks.modules.parameters()).dtype
    dtype = compute_dtype(device, model_dtype)
    inputs, kwargs = capture_block_inputs(model, blocks, calib_ids, device, dtype)
    inputs = inputs.to("cpu")
    ids = calib_ids.to(device)
    norm, head = _head_modules(model, blocks)
    head_name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    per_layer: dict[str, dict[str, float]] = {n: {} for n in scope.available}
    losses: dict[str, float] = {}
    quantized_options = [o for o in options if o is not None]
    for n in scope.available:
        if None in scope.available[n]:
            per_layer[n][SIXTEEN] = 0.0  # W - Q(W) = 0: nothing to restore

    def schemes_for(option) -> dict[str, Option]:
        chosen = dict(scope.fixed)
        for n, avail in scope.available.items():
            chosen[n] = option if option in avail else None
        return chosen

    head_home = head.weight.device
    bar = tqdm(total=len(quantized_options) * len(blocks.modules) * 2, desc="AutoScheme scores", disable=not progress, unit="block")
    for option in quantized_options:
        chosen = schemes_for(option)
        # forward: cache every block's input
        cache = [inputs]
        h = inputs
        for i, block in enumerate(blocks.modules):
            prefix = blocks.name(i) + "."
            block.to(device, dtype)
            qw = {n[len(prefix):] + ".weight": _quantized(block.get_submodule(n[len(prefix):]).weight, s)
                  for n, s in chosen.items() if n.startswith(prefix) and s is not None}
            out = torch.empty_like(h)
            with torch.no_grad():
                for b in range(0, h.shape[0], batch_size):
                    x = h[b:b + batch_size].to(device)
                    out[b:b + batch_size] = block_output(functional_call(block, qw, (x,), kwargs)).to("cpu")
            block.to("cpu", model_dtype)
            cache.append(out)
            h = out
            bar.update()
        # head: loss and its gradient at the last block's output
        for m in (norm, head):
            if m is not None:
                m.to(device, dtype)
        head_scheme = chosen.get(head_name)
        head_w = head.weight.detach()
        head_q = _quantized(head_w, head_scheme).detach().requires_grad_(head_scheme is not None)
        grad = torch.empty_like(h)
        total_loss, head_score = 0.0, 0.0
        with torch.enable_grad():
            for b in range(0, h.shape[0], batch_size):
                x = h[b:b + batch_size].to(device).requires_grad_(True)
                y = norm(x) if norm is not None else x
                logits = F.linear(y, head_q, head.bias).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                target = ids[b:b + batch_size, 1:]
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum") / tokens
                loss.backward()
                total_loss += loss.item()
                grad[b:b + batch_size] = x.grad.to("cpu")
                if head_scheme is not None and head_name in per_layer:
                    head_score += layer_score(head_q.grad, head_w - head_q.detach())
                    head_q.grad = None
        if head_name in per_layer and head_scheme is not None:
            per_layer[head_name][option_name(option)] = head_score
        for m in (norm, head):
            if m is not None:
                m.to(head_home, model_dtype)
        losses[option_name(option)] = total_loss
        # backward, block by block
        for i in range(len(blocks.modules) - 1, -1, -1):
            block = blocks.modules[i]
            prefix = blocks.name(i) + "."
            block.to(device, dtype).requires_grad_(False)
            orig = {n: block.get_submodule(n[len(prefix):]).weight.detach() for n, s in chosen.items() if n.startswith(prefix) and s is not None}
            q = {n: _quantized(w, chosen[n]).detach().requires_grad_(True) for n, w in orig.items()}
            params = {n[len(prefix):] + ".weight": t for n, t in q.items()}
            score = {n: 0.0 for n in q if n in per_layer}
            with torch.enable_grad():
                for b in range(0, grad.shape[0], batch_size):
                    x = cache[i][b:b + batch_size].to(device).requires_grad_(True)
                    out = block_output(functional_call(block, params, (x,), kwargs))
                    out.backward(grad[b:b + batch_size].to(device))
                    grad[b:b + batch_size] = x.grad.to("cpu")
                    for n in score:
                        score[n] += layer_score(q[n].grad, orig[n] - q[n].detach())
                    for t in q.values():
                        t.grad = None
            for n, s in score.items():
                per_layer[n][option_name(option)] = s
            block.to("cpu", model_dtype)
            bar.update()
        del cache
    bar.close()
    return Scores(per_layer, losses, time.time() - start)


# --------------------------------------------------------------------------------------------------------
# the whole step


@dataclass
class AutoSchemePlan:
    target: float
    average: float  # achieved, counted by layer_bits
    options: list[Option]
    choices: dict[str, Option]  # every counted layer -> its scheme (None: 16-bit)
    fixed: dict[str, str]  # counted layers the allocation did not choose -> why
    shapes: dict[str, tuple[int, int]]
    scores: dict[str, dict[str, float]]
    layer_config: dict[str, dict]  # for plan_layers / --layer_config: exact names first, then the user's
    base_scheme: Scheme  # the scheme covering the most weights: the checkpoint's default
    reachable: tuple[float, float]
    total_score: float
    score_seconds: float
    score_method: str
    option_loss: dict[str, float]
    ignore_scale_zp_bits: bool = False
    unavailable: dict[str, dict[str, str]] = field(default_factory=dict)  # layer -> option -> why it cannot take it
    floor: str | None = None  # the richest uniform option within the target: no chosen layer has fewer bits

    def summary(self) -> str:
        counted = "weights only (scale and zero-point bits ignored)" if self.ignore_scale_zp_bits else \
            "weights + 16-bit scales + zero points of asym schemes"
        names = [option_name(o) for o in self.options]
        lines = [
            f"AutoScheme: target {self.target:g} bits, achieved {self.average:.4f} bits per weight ({counted}; "
            f"reachable {self.reachable[0]:.4f} .. {self.reachable[1]:.4f})",
            f"  scores: first-order Taylor at the quantized weights, {self.score_method}, {self.score_seconds:.1f} s; "
            + ", ".join(f"loss at all-{k} {v:.4f}" for k, v in self.option_loss.items()),
        ]
        if self.floor:
            lines.append(f"  floor: {self.floor} (the richest uniform option within the target; no layer gets fewer bits)")
        width = max(len(n) for n in self.choices)
        lines.append(f"  {'layer'.ljust(width)}  {'choice':>10}  {'bits/w':>7}  " + "  ".join(f"{('score ' + n):>16}" for n in names))
        for name, scheme in self.choices.items():
            out_f, in_f = self.shapes[name]
            bpw = layer_bits(out_f, in_f, scheme, self.ignore_scale_zp_bits) / (out_f * in_f)
            row = self.scores.get(name, {})
            cells = "  ".join(f"{row[n]:16.4g}" if n in row else f"{'-':>16}" for n in names)
            note = f"  ({self.fixed[name]})" if name in self.fixed else ""
            lines.append(f"  {name.ljust(width)}  {option_name(scheme):>10}  {bpw:7.3f}  {cells}{note}")
        counts: dict[str, int] = {}
        for s in self.choices.values():
            counts[option_name(s)] = counts.get(option_name(s), 0) + 1
        lines.append("  layers per scheme: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for name, why in self.unavailable.items():
            lines.append(f"  unavailable for {name}: " + "; ".join(f"{k} ({v})" for k, v in why.items()))
        lines.append(f"  average {self.average:.4f} <= target {self.target:g}")
        return "\n".join(lines)


def save_picture(plan: AutoSchemePlan, path) -> bool:
    """``path`` (PNG): each layer's chosen bits per weight (bars, coloured by scheme) above each option's
    score of that layer (log scale). False, writing nothing, when matplotlib is not installed (the same
    numbers are in the text summary)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    names = list(plan.choices)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(8.0, 0.18 * len(names)), 6.5), layout="constrained")
    bits_ax, score_ax = fig.subplots(2, 1, sharex=True)
    chosen = [option_name(plan.choices[n]) for n in names]
    bpw = [layer_bits(*plan.shapes[n], plan.choices[n], plan.ignore_scale_zp_bits) / math.prod(plan.shapes[n]) for n in names]
    colour = {option_name(o): f"C{k}" for k, o in enumerate(plan.options)}  # one colour per option, both panels
    for label in dict.fromkeys(chosen):
        pick = [i for i, c in enumerate(chosen) if c == label]
        bits_ax.bar(x[pick], [bpw[i] for i in pick], color=colour.get(label, "grey"), label=label)
    bits_ax.axhline(plan.target, color="k", linestyle="--", linewidth=1, label=f"target {plan.target:g}")
    bits_ax.set_ylabel("bits per weight")
    bits_ax.set_title(f"AutoScheme: average {plan.average:.4f} bits per weight (target {plan.target:g})")
    bits_ax.legend(loc="upper right", fontsize="small")
    for label in colour:
        pts = [(i, plan.scores[n][label]) for i, n in enumerate(names) if plan.scores.get(n, {}).get(label, 0) > 0]
        if pts:
            score_ax.scatter(*zip(*pts), s=12, color=colour[label], label=label)
    score_ax.set_yscale("log")
    score_ax.set_ylabel("score (estimated loss)")
    score_ax.legend(loc="upper right", fontsize="small")
    score_ax.set_xticks(x, names, rotation=90, fontsize=5)
    fig.savefig(path, dpi=120)
    return True


def _width(option: Option) -> int:
    return KEEP_BITS if option is None else option.bits


def uniform_floor(units: list[Unit], free_budget: int) -> Option:
    """The richest option (most bits per weight) that every unit can take and that fits the budget given to
    all of them at once, or None when none does (then the floor is the cheapest option of each unit).

    The allocation gives no unit fewer bits per weight than this: the plan then holds every layer at
    least as precise as the best uniform model within the target, and spends the rest of the budget on
    upgrades. Without it the first-order score can trade layers down to a width the budget did not
    require, to fund upgrades elsewhere (2-bit layers in a 4.5-bit plan), a trade the score cannot rank
    well: at integer budgets the SignRoundV2 paper saw AutoRound's mix lose to the uniform scheme."""
    common = [o for o in units[0].options if all(o in u.options for u in units)] if units else []
    fitting = [o for o in common if sum(u.bits[u.options.index(o)] for u in units) <= free_budget]
    return max(fitting, key=_width, default=None)


def _at_least(unit: Unit, floor: Option) -> Unit:
    keep = [i for i, o in enumerate(unit.options) if _width(o) >= _width(floor)]
    return Unit(unit.name, unit.layers, [unit.options[i] for i in keep], [unit.bits[i] for i in keep],
                [unit.scores[i] for i in keep])


def _spec(option: Option) -> dict:
    return {"bits": KEEP_BITS} if option is None else {"bits": option.bits, "group_size": option.group_size, "sym": option.sym}


def plan_from_scores(
    scope: Scope,
    options: list[Option],
    scores: dict[str, dict[str, float]],
    target: float,
    ignore_scale_zp_bits: bool = False,
    user_layer_config: dict[str, dict] | None = None,
) -> tuple[dict[str, Option], float, tuple[float, float], float, Option]:
    """(choices, achieved average, reachable range, total score, floor) for ``target`` bits per weight; the
    floor (:func:`uniform_floor`) is the fewest bits per weight any chosen layer has (None: no floor)."""
    units = build_units(scope, scores, ignore_scale_zp_bits)
    params = sum(o * i for o, i in scope.shapes.values())
    fixed_bits = sum(layer_bits(*scope.shapes[n], s, ignore_scale_zp_bits) for n, s in scope.fixed.items())
    low = fixed_bits + sum(min(u.bits) for u in units)
    high = fixed_bits + sum(max(u.bits) for u in units)
    reachable = (low / params, high / params)
    if not units:
        raise UserError("AutoScheme has no layer to choose for: every layer is pinned, ignored or fits no option")
    target_q = Fraction(str(target))
    budget = math.floor(target_q * params)  # total bits allowed: the average never exceeds the target
    if budget < low or target_q * params > high:
        fixed_note = f" ({len(scope.fixed)} fixed layers count at their pinned bits)" if scope.fixed else ""
        side = "below the cheapest plan" if budget < low else "above the richest plan"
        hint = "raise --bits or add a cheaper option (e.g. W2A16)" if budget < low else "lower --bits or add a richer option (e.g. W8A16 or BF16)"
        raise UserError(
            f"target {target:g} bits is {side}: the options {', '.join(option_name(o) for o in options)} reach "
            f"{reachable[0]:.4f} to {reachable[1]:.4f} bits per weight on this model{fixed_note}; {hint}"
        )
    floor = uniform_floor(units, budget - fixed_bits)
    if floor is not None:
        units = [_at_least(u, floor) for u in units]
    picks, total_score = allocate(units, budget - fixed_bits)
    choices = {}
    for name in scope.shapes:
        if name in scope.fixed:
            choices[name] = scope.fixed[name]
    for unit, k in zip(units, picks):
        for m in unit.layers:
            choices[m] = unit.options[k]
    choices = {n: choices[n] for n in scope.shapes}
    total = sum(layer_bits(*scope.shapes[n], s, ignore_scale_zp_bits) for n, s in choices.items())
    if total > budget:  # cannot happen: allocate() keeps every state within the budget
        raise RuntimeError(f"AutoScheme plan of {total} bits exceeds the budget of {budget}")
    return choices, total / params, reachable, total_score, floor


def choose_schemes(
    model: nn.Module,
    blocks: Blocks,
    options,
    target: float,
    calib_ids: torch.Tensor,
    layer_config: dict[str, dict] | None = None,
    ignore: list[str] | None = None,
    quant_lm_head: bool = False,
    ignore_scale_zp_bits: bool = False,
    base: Scheme | None = None,
    layout_for=None,
    device: torch.device | str = "cpu",
    batch_size: int = SCORE_BATCH,
    progress: bool = True,
) -> AutoSchemePlan:
    """AutoScheme on a loaded model: scores, then the exact allocation for ``target`` bits per weight.

    ``options``: names (``"W2A16,W4A16"``, ``["W2A16", "BF16"]``) or Schemes. ``calib_ids``: ``[n, seqlen]``
    token ids (AutoRound scores on 16 x 256). The model is left as it was. Returns the plan; pass its
    ``layer_config`` and ``base_scheme`` to :func:`quantize.layer_config.plan_layers`.
    """
    options = parse_options(options)
    if not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise UserError(f"the target average bits must be a positive number, got {target!r}")
    scope = find_scope(model, blocks, options, layer_config, ignore, quant_lm_head, base, layout_for)
    # The range check needs only bits: fail before the scoring passes.
    plan_from_scores(scope, options, {}, target, ignore_scale_zp_bits)
    scores = score_options(model, blocks, scope, options, calib_ids, device, batch_size, progress)
    choices, average, reachable, total_score, floor = plan_from_scores(scope, options, scores.per_layer, target, ignore_scale_zp_bits)
    fixed = dict(scope.why_fixed)
    weight_per_scheme: dict[Scheme, int] = {}
    for n, s in choices.items():
        if s is not None:
            weight_per_scheme[s] = weight_per_scheme.get(s, 0) + scope.shapes[n][0] * scope.shapes[n][1]
    base_scheme = max(weight_per_scheme, key=weight_per_scheme.get) if weight_per_scheme else (base or get_scheme("W4A16"))
    config = {n: _spec(s) for n, s in choices.items()}
    for pattern, spec in (layer_config or {}).items():
        config.setdefault(pattern, spec)
    return AutoSchemePlan(
        target=float(target), average=average, options=list(options), choices=choices, fixed=fixed,
        shapes=dict(scope.shapes), scores=scores.per_layer, layer_config=config, base_scheme=base_scheme,
        reachable=reachable, total_score=total_score, score_seconds=scores.seconds, score_method=scores.method,
        option_loss=scores.loss, ignore_scale_zp_bits=ignore_scale_zp_bits, unavailable=dict(scope.unavailable),
        floor=None if floor is None else option_name(floor),
    )
