"""Multi-token-prediction (MTP) layers: weights in the source checkpoint that transformers does not build.

DeepSeek-V3 (``model.layers.{num_hidden_layers}.*``: ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head``
and a full decoder layer), GLM-4.5 and others ship MTP layers that vLLM uses as the draft model of
``--speculative-config '{"method": "mtp"}'`` with the main model's quantization config, and vLLM errors
when they are missing. transformers drops these tensors on load, so a checkpoint written from the loaded
model would lack them. :func:`unbuilt_tensors` reads them back from the source shards, and
:func:`mtp_layers` decides each one's form, as AutoRound does (it copies them after saving and rounds
them with RTN): the MTP decoder layer's linear projections are quantized with round-to-nearest (their
inputs cannot be captured: transformers never runs the layer), while ``eh_proj`` (vLLM builds it as a
plain ``nn.Linear``), ``shared_head.head``, embeddings, norms and MoE routers stay 16-bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from quantize.numerics import quantize_weight
from quantize.scheme import Scheme, match_name

# 2-D weights of an MTP layer that stay 16-bit: vLLM builds eh_proj as nn.Linear, the shared head is the
# output projection, the router gates route.
KEEP = re.compile(r"(eh_proj|shared_head|embed_tokens|\.gate\.|\.router\.|norm)")


def _source_files(source_dir: Path) -> list[Path]:
    index = source_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({source_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(source_dir.glob("*.safetensors"))


def unbuilt_tensors(source_dir, stored: set[str], prefixes: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of the source checkpoint under ``prefixes`` that are not in ``stored`` (the names the
    export writes, quantized layers' weights included): what transformers did not build (MTP layers).
    Only those are read."""
    if not source_dir or not Path(source_dir).is_dir():
        return {}
    out = {}
    for f in _source_files(Path(source_dir)):
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                if key not in stored and any(key.startswith(p + ".") for p in prefixes):
                    out[key] = sf.get_tensor(key)
    return out


def mtp_prefixes(config) -> list[str]:
    """Where the config says MTP layers live: ``model.layers.{N}`` for N past the decoder layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_nextn_predict_layers", 0) or getattr(text, "num_mtp_layers", 0) or 0
    first = getattr(text, "num_hidden_layers", 0)
    return [f"model.layers.{first + i}" for i in range(n)] + (["model.mtp"] if n else [])


def mtp_layers(tensors: dict[str, torch.Tensor], prefixes: list[str], scheme: Scheme, layer_config: dict | None = None):
    """(quantized, kept): linear weights of the MTP layers quantized with RTN (name -> (QuantizedWeight,
    (out, in))), and why the others stay 16-bit (name -> reason). ``layer_config`` (pattern -> fields,
    ``bits >= 16`` keeps) applies as to the other layers."""
    from dataclasses import replace

    from quantize.signround import QuantizedWeight

    quantized, kept = {}, {}
    for key, t in tensors.items():
        if not key.endswith(".weight") or not any(key.startswith(p + ".") for p in prefixes):
            continue
        name = key[: -len(".weight")]
        if t.dim() != 2 or not t.is_floating_point():
            continue
        if KEEP.search(name + "."):
            kept[name] = "MTP projection kept 16-bit (eh_proj / shared head / router / norm)"
            continue
        layer_scheme = scheme
        for pattern, spec in (layer_config or {}).items():
            if match_name(pattern, name):
                layer_scheme = None if spec.get("bits", scheme.bits) >= 16 else replace(scheme, **spec)
                break
        if layer_scheme is None:
            kept[name] = "layer_config keeps it 16-bit"
            continue
        n, k = t.shape
        if layer_scheme.group_size != -1 and k % layer_scheme.group_size:
            kept[name] = f"in_features {k} is not a multiple of group_size {layer_scheme.group_size}"
            continue
        q, scales, zeros = quantize_weight(t.float(), layer_scheme.bits, layer_scheme.group_size, layer_scheme.sym)
        quantized[name] = (QuantizedWeight(q, scales, zeros, layer_scheme), (n, k))
    return quantized, kept


def add_mtp(source, model_dir, scheme: Scheme, layer_config: dict | None = None) -> tuple[int, int]:
    """Add the MTP layers of the source checkpoint ``model_dir`` to ``source`` (an ExportSource): quantized
    projections as layers, the rest as 16-bit tensors; returns (quantized, kept) counts."""
    prefixes = mtp_prefixes(source.config)
    if not prefixes:
        return 0, 0
    stored = set(source.tensors) | {f"{n}.weight" for n in source.layers}
    extra = unbuilt_tensors(model_dir, stored, prefixes)
    if not extra:
        return 0, 0
    quantized, kept = mtp_layers(extra, prefixes, scheme, layer_config)
    for name, (qw, shape) in quantized.items():
        source.layers[name] = qw
        source.linear_shapes[name] = shape
        extra.pop(f"{name}.weight")
    for name in kept:
        t = extra[f"{name}.weight"]
        source.linear_shapes[name] = tuple(t.shape)
    for key, t in extra.items():
        source.tensors[key] = t.to(source.dtype) if t.is_floating_point() else t
    return len(quantized), len(kept)
