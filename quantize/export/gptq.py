"""The auto_gptq format: AutoGPTQ/GPTQModel's ``quant_method: "gptq"`` checkpoint.

Tensors ``qweight``/``qzeros``/``scales``/``g_idx`` in the ``gptq`` layout (zero points stored minus one),
``desc_act: false`` (groups in natural order, so ``g_idx`` is ``k // group_size``). Layers that differ
from the most common scheme, and layers inside the blocks that stay 16-bit, go in GPTQModel's ``dynamic``
field (``+:regex`` overrides, ``-:regex`` skips), which vLLM reads too.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from quantize.export.fused import fused_groups
from quantize.export.hf_folder import write_hf_folder, write_json
from quantize.export.registry import ExportError, exporter
from quantize.export.source import ExportSource
from quantize.packing import layout_fits, pack
from quantize.scheme import Scheme

_FIELDS = ("bits", "group_size", "sym")


def main_scheme(source: ExportSource) -> Scheme:
    """The scheme most quantized layers have: the config's top level, so ``dynamic`` stays short."""
    return Counter(w.scheme for w in source.layers.values()).most_common(1)[0][0]


def _check(name: str, w, k: int, n: int) -> None:
    why = layout_fits("gptq", w.scheme.bits, k, n)
    if why:
        raise ExportError(f"layer {name} cannot be stored as GPTQ: {why}")
    half = 2 ** (w.scheme.bits - 1)
    if w.scheme.sym and not bool((w.zeros == half).all()):
        raise ExportError(f"layer {name} is marked symmetric but has zero points other than {half}; GPTQ readers ignore them for sym layers")
    if not w.scheme.sym and bool((w.zeros == 0).any()):
        raise ExportError(
            f"layer {name} has a group with zero point 0, which GPTQ's zero-minus-one convention cannot store "
            "(it would read back as 1): export auto_awq, llm_compressor or auto_round instead, which store zero points as they are"
        )


def dynamic_rules(source: ExportSource, main: Scheme) -> dict[str, dict]:
    """GPTQModel's ``dynamic``: per-layer overrides and skips, matched with ``re.match`` on module names.
    Fused layers (vLLM's qkv_proj, gate_up_proj) get a rule too when all their shards agree."""
    rules: dict[str, dict | None] = {name: None for name in source.kept_in_blocks}
    for name, w in source.layers.items():
        diff = {f: getattr(w.scheme, f) for f in _FIELDS if getattr(w.scheme, f) != getattr(main, f)}
        if diff:
            rules[name] = diff
    for fused, shards in fused_groups(source.linear_shapes).items():
        if all(s in rules for s in shards) and all(rules[s] == rules[shards[0]] for s in shards):
            rules[fused] = rules[shards[0]]
    return {("-:" if r is None else "+:") + re.escape(name) + "$": r or {} for name, r in rules.items()}


def gptq_config(source: ExportSource) -> dict:
    main = main_scheme(source)
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": main.bits,
        "group_size": main.group_size,
        "sym": main.sym,
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": "lm_head" in source.layers,
        "meta": {"quantizer": [source.metadata.get("quantizer", "quantize-llm")]},
    }
    dynamic = dynamic_rules(source, main)
    if dynamic:
        config["dynamic"] = dynamic
    return config


def gptq_tensors(source: ExportSource) -> dict[str, torch.Tensor]:
    state = dict(source.tensors)
    for name, w in source.layers.items():
        n, k = source.linear_shapes[name]
        _check(name, w, k, n)
        packed = pack("gptq", w.q, w.scales, w.zeros, w.scheme.bits)
        g = k if w.scheme.group_size == -1 else w.scheme.group_size
        state[f"{name}.qweight"] = packed.qweight
        state[f"{name}.qzeros"] = packed.qzeros
        state[f"{name}.scales"] = packed.scales
        state[f"{name}.g_idx"] = torch.arange(k, dtype=torch.int32) // g
    return state


@exporter("auto_gptq", summary="GPTQ layout, quant_method gptq; bits 2/3/4/8, mixed bits via dynamic")
def write_gptq(source: ExportSource, folder: Path, option: str | None = None) -> None:
    config = gptq_config(source)
    write_hf_folder(source, folder, gptq_tensors(source), config)
    write_json(folder / "quantize_config.json", config)  # where AutoGPTQ itself looks for it
