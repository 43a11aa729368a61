"""Input-activation fake-quantization of a scheme's linear layers: calibration of the static scales, and the
forward pre-hooks that apply ``numerics_act`` during tuning and in the quantized model held in memory.

Static statistics (``Scheme.static_activations``) come from the layer's inputs over the calibration set:

- NVFP4: ``input_global_scale = 448 * 6 / amax`` (``numerics_nvfp4.global_scale``); q/k/v and gate/up
  (one fused GEMM in vLLM, one input) share one: the smallest, i.e. the largest amax.
- FP8_STATIC: ``input_scale = amax / 448`` per tensor (``numerics_act.fp8_static_scale``), fused the same way.

The dynamic rules (MX, FP8 1x128 groups, int per token) need nothing but the input itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantize import numerics_act, numerics_mx, numerics_nvfp4
from quantize.model import UserError
from quantize.scheme import Scheme

HOOK_ATTR = "_quantize_act_hook"


def needs_calibration(schemes) -> list[str]:
    """Names (or preset names) of schemes that cannot be quantized without activation statistics."""
    return sorted({s.name for s in schemes if s.static_activations})


def check_calibration(schemes, nsamples: int) -> None:
    """NVFP4 (input global scale) and FP8_STATIC (input scale) need calibration data even at ``--iters 0``."""
    static = needs_calibration(schemes)
    if static and nsamples < 1:
        raise UserError(
            f"{', '.join(static)} quantizes activations with a static scale calibrated from the layer inputs "
            "(NVFP4: the input global scale; FP8_STATIC: the per-tensor input scale): it needs calibration data "
            "even at --iters 0. Give --dataset (a .txt/.jsonl file, 'bundled' or a hub id) and --nsamples >= 1"
        )


def quantizer(scheme: Scheme, static: dict[str, torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The input fake-quantization of a layer of ``scheme`` (None: 16-bit activations)."""
    if not scheme.quantizes_activations:
        return None
    static = static or {}
    kind = scheme.act_data_type
    if kind == "mx_fp":
        fmt = numerics_mx.MXFP4 if scheme.act_bits == 4 else numerics_mx.MXFP8
        return lambda x: numerics_act.mx_dynamic(x, fmt, scheme.act_group_size)
    if kind.startswith("nv_fp"):
        gs = static["input_global_scale"]
        return lambda x: numerics_act.nvfp4(x, gs.to(x.device), scheme.act_group_size)
    if kind == "fp" and not scheme.act_dynamic:
        scale = static["input_scale"]
        return lambda x: numerics_act.fp8_static(x, scale.to(x.device))
    if kind == "fp":
        return lambda x: numerics_act.fp8_group_dynamic(x, scheme.act_group_size)
    if kind == "int":
        return lambda x: numerics_act.int_per_token(x, scheme.act_bits)
    raise ValueError(f"no activation rule for {scheme}")


def _pre_hook(fn):
    def hook(_module, args):
        return (fn(args[0]), *args[1:])

    return hook


def install(module: nn.Module, fn) -> None:
    """Fake-quantize ``module``'s input from now on (replacing an earlier one); ``fn=None`` removes it."""
    old = getattr(module, HOOK_ATTR, None)
    if old is not None:
        old.remove()
        delattr(module, HOOK_ATTR)
    if fn is not None:
        setattr(module, HOOK_ATTR, module.register_forward_pre_hook(_pre_hook(fn)))


def install_all(block: nn.Module, quantizers: dict[str, Callable | None]) -> None:
    for name, fn in quantizers.items():
        if fn is not None:
            install(block.get_submodule(name), fn)


def remove_all(block: nn.Module, names) -> None:
    for name in names:
        install(block.get_submodule(name), None)


@torch.no_grad()
def input_amax(block: nn.Module, names: list[str], inputs: torch.Tensor, block_kwargs: dict, batch: int, amp: bool) -> dict[str, torch.Tensor]:
    """Largest input magnitude of each named linear layer over ``inputs`` (float32 scalars)."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            m = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m

        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
            for x in inputs.split(batch):
                block(x, **block_kwargs)
    finally:
        for h in handles:
            h.remove()
    return amax


def calibrate(block: nn.Module, layers: dict[str, Scheme], inputs: torch.Tensor, block_kwargs: dict, batch: int, amp: bool) -> dict[str, dict]:
    """Static activation scales of the layers whose scheme needs them: ``{name: {"input_global_scale": [1]}}``
    (NVFP4) or ``{name: {"input_scale": [1]}}`` (FP8_STATIC). Fused layers share the largest amax."""
    from quantize.export.fused import fused_groups  # here: quantize.export imports the quantizer, which imports this

    static = [n for n, s in layers.items() if s.static_activations]
    if not static:
        return {}
    if len(inputs) == 0:
        check_calibration([layers[n] for n in static], 0)
    amax = input_amax(block, static, inputs, block_kwargs, batch, amp)
    for shards in fused_groups(static).values():
        shared = max((amax[s] for s in shards if s in amax), default=None)
        for s in shards:
            if shared is not None:
                amax[s] = shared
    out = {}
    for name in static:
        a = amax.get(name, torch.tensor(0.0))  # a layer no input reached (an unrouted expert): neutral scales
        if layers[name].act_data_type.startswith("nv_fp"):
            out[name] = {"input_global_scale": numerics_nvfp4.global_scale(a).reshape(1)}
        else:
            out[name] = {"input_scale": numerics_act.fp8_static_scale(a).reshape(1)}
    return out


def weight_contexts(weights: dict[str, torch.Tensor], layers: dict[str, Scheme]) -> dict[str, dict]:
    """What each layer's weight rule needs fixed before tuning: NVFP4's global scale, from the untuned
    weights, shared by fused shards (``numerics_nvfp4.fused_global_scale``)."""
    from quantize.export.fused import fused_groups

    nv = [n for n, s in layers.items() if s.data_type == "nv_fp"]
    ctx: dict[str, dict] = {n: {} for n in layers}
    amax = {n: weights[n].detach().float().abs().amax() for n in nv}
    done = set()
    for shards in fused_groups(nv).values():
        gs = numerics_nvfp4.fused_global_scale([amax[s] for s in shards])
        for s in shards:
            ctx[s]["global_scale"] = gs.to(weights[s].device)
            done.add(s)
    for n in nv:
        if n not in done:
            ctx[n]["global_scale"] = numerics_nvfp4.global_scale(amax[n]).to(weights[n].device)
    return ctx
