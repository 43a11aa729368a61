"""``python -m quantize convert CKPT --to FORMAT``: rewrite an auto_round checkpoint (ours or Intel
AutoRound's) in another format without re-tuning. The integer codes, scales and zero points are read
back exactly (quantize.packing), so every target that can express them gets bit-identical weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantize.checkpoint import CheckpointConfig, ConfigError, check_layer_tensors
from quantize.export import registry
from quantize.export.atomic import check_output_dir
from quantize.export.source import ExportSource, linear_shapes_of
from quantize.model import UserError
from quantize.packing import PACKED_TENSORS, PackedLinear, unpack
from quantize.signround import QuantizedWeight


def _read_config(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: point convert at an auto_round checkpoint folder")
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    if qcfg is None:
        raise UserError(f"{path} is not quantized (its config.json has no quantization_config): quantize it first with `python -m quantize`")
    return qcfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no .safetensors files: only safetensors checkpoints can be converted")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _unpack_layer(name: str, scheme, layout: str, tensors: dict, out_features: int, in_features: int) -> QuantizedWeight:
    shapes = {f"{name}.{f}": tuple(tensors[f"{name}.{f}"].shape) for f in PACKED_TENSORS if f"{name}.{f}" in tensors}
    check_layer_tensors(name, layout, scheme.bits, scheme.group_size, in_features, out_features, shapes)
    packed = PackedLinear(*(tensors.pop(f"{name}.{f}") for f in PACKED_TENSORS))
    q, scales, zeros = unpack(layout, packed, scheme.bits, in_features, out_features)
    return QuantizedWeight(q, scales.to(torch.float16), zeros, scheme)


def _read_fp_layer(name: str, scheme, tensors: dict, out_features: int, in_features: int) -> QuantizedWeight:
    """One layer of an FP auto_round checkpoint (Intel's layout: quantize.export.auto_round_fp), in the form
    tuning produces (quantize.weight_rules)."""
    from quantize.fp_layout import checkpoint_tensors

    got = {}
    for key, (shape, _dtype) in checkpoint_tensors(scheme, in_features, out_features).items():
        full = f"{name}.{key}"
        if full not in tensors:
            raise ConfigError(f"layer {name}: tensor {full} is missing from the checkpoint")
        if tuple(tensors[full].shape) != shape:
            raise ConfigError(f"layer {name}: tensor {full} has shape {list(tensors[full].shape)}, expected {list(shape)} for {scheme.name}")
        got[key] = tensors.pop(full)
    q = got.pop("weight_packed", None)
    q = got.pop("weight") if q is None else q
    scales = got.pop("weight_scale")
    if scheme.data_type == "fp":
        scales = scales.float().reshape(-1, 1)
    return QuantizedWeight(q, scales, torch.zeros(0, dtype=torch.uint8), scheme, {k: t.float() for k, t in got.items()})


def load_auto_round(path: str | Path) -> ExportSource:
    """An auto_round checkpoint as integer codes per layer, ready for any exporter."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"checkpoint folder {path} does not exist")
    ckpt = CheckpointConfig.from_dict(_read_config(path))
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # transformers' loader for it is not needed to read the tensors
    shapes = linear_shapes_of(config)
    tensors = _read_tensors(path)
    layers = {}
    for name, (n, k) in shapes.items():
        scheme = ckpt.layer_scheme(name)
        if scheme is not None and not scheme.integer_weight_only:
            layers[name] = _read_fp_layer(name, scheme, tensors, n, k)
        elif scheme is not None:
            layers[name] = _unpack_layer(name, scheme, ckpt.layout, tensors, n, k)
    if not layers:
        raise ConfigError(f"no linear layer of {config.model_type} matches block_name_to_quantize={ckpt.block_name_to_quantize}")
    # The unquantized tensors (embeddings, norms) are in the model's dtype.
    dtype = Counter(t.dtype for t in tensors.values() if t.is_floating_point()).most_common(1)[0][0]
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    generation = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").exists() else None
    metadata = {k: v for k, v in ckpt.metadata.items() if isinstance(v, (str, int, float, bool))}
    return ExportSource(config, tensors, layers, shapes, list(ckpt.block_name_to_quantize), ckpt.default_scheme,
                        dtype, path.name, tokenizer, generation, metadata)


def convert(checkpoint: str | Path, formats: str, output_dir: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``checkpoint`` in each of ``formats`` (``"auto_gptq,gguf:q4_k_m"``); returns the folders."""
    specs = registry.parse_formats(formats)
    src = Path(checkpoint).expanduser().resolve()
    out = check_output_dir(output_dir or src.with_name(f"{src.name}-{'-'.join(s.folder for s in specs)}"), overwrite)
    return registry.export(load_auto_round(src), specs, out, overwrite)
