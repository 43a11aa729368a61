"""Which layers get quantized, with which scheme, and why the others stay 16-bit."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import nn

from quantize.model import UserError
from quantize.packing import layout_fits
from quantize.scheme import Scheme, match_name

# ``bits >= 16`` in a layer override means "keep this layer in 16-bit", as in AutoRound's layer_config.
KEEP_BITS = 16


@dataclass
class LayerPlan:
    quantize: dict[str, Scheme] = field(default_factory=dict)  # full layer name -> scheme
    keep: dict[str, str] = field(default_factory=dict)  # full layer name -> why it stays 16-bit


def _override(scheme: Scheme, name: str, layer_config: dict[str, dict]) -> Scheme | None:
    """The scheme for ``name`` after the first matching override; None if an override keeps it 16-bit."""
    for pattern, spec in layer_config.items():
        if match_name(pattern, name):
            unknown = set(spec) - {f.name for f in fields(Scheme)}
            if unknown:
                raise UserError(
                    f"layer_config[{pattern!r}] has unknown fields {sorted(unknown)}; allowed: bits, group_size, sym, data_type"
                )
            if spec.get("bits", scheme.bits) >= KEEP_BITS:
                return None
            try:
                return replace(scheme, **spec)
            except ValueError as e:
                raise UserError(f"layer_config[{pattern!r}]: {e}") from e
    return scheme


def plan_layers(
    model: nn.Module,
    block_prefix: str,
    scheme: Scheme,
    layer_config: dict[str, dict] | None = None,
    ignore: list[str] | None = None,
    quant_lm_head: bool = False,
    layout_for=None,
) -> LayerPlan:
    """Every nn.Linear inside the blocks (and lm_head if asked) with its scheme, or the reason it is kept.

    ``layout_for(scheme) -> layout`` names the packing layout the checkpoint will use, so that layers the
    layout cannot hold are kept 16-bit up front instead of failing at export.
    """
    layer_config = layer_config or {}
    ignore = ignore or []
    plan = LayerPlan()
    from quantize.moe import has_routed_experts, moe_keep

    from quantize.vlm import cross_attention_keep, kept_towers

    moe = has_routed_experts(model)
    special = cross_attention_keep(model, block_prefix)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_tied = head is not None and head.weight is model.get_input_embeddings().weight
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        in_block = name.startswith(block_prefix + ".")
        is_head = module is head
        if not in_block and not (is_head and quant_lm_head):
            if is_head:
                plan.keep[name] = "lm_head stays 16-bit (--quant-lm-head to quantize it)"
            continue
        if is_head and head_tied:
            plan.keep[name] = "lm_head shares its weight with the input embeddings"
            continue
        if any(match_name(p, name) for p in ignore):
            plan.keep[name] = "in the ignore list"
            continue
        why = special.get(name) or (moe_keep(name, module) if moe else None)
        if why:
            plan.keep[name] = why
            continue
        layer_scheme = _override(scheme, name, layer_config)
        if layer_scheme is None:
            plan.keep[name] = "layer_config keeps it 16-bit"
            continue
        k, n = module.in_features, module.out_features
        g = layer_scheme.k_multiple  # None: any in_features (per channel, per tensor, FP8's partial blocks)
        if g and k % g:
            plan.keep[name] = f"in_features {k} is not a multiple of group_size {g}"
            continue
        why = layout_fits(layout_for(layer_scheme), layer_scheme.bits, k, n) if layout_for else None
        if why:
            plan.keep[name] = why
            continue
        plan.quantize[name] = layer_scheme
    plan.keep.update(kept_towers(model, block_prefix))  # VLMs: vision tower and projector, per module
    if not plan.quantize:
        reasons = sorted(set(plan.keep.values()))
        raise UserError(
            "no layer can be quantized with this scheme"
            + (f" ({'; '.join(reasons)})" if reasons else "")
            + ": choose a group size that divides the layers' in_features, e.g. --group_size 32 or -1"
        )
    return plan
