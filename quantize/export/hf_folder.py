"""The parts every Hugging Face-style format shares: config.json with its quantization_config,
safetensors weights, tokenizer and generation config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"


def write_hf_folder(source, folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    """Write ``tensors`` and the model's config (with ``quantization_config`` when given) into ``folder``."""
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, folder / WEIGHTS, metadata={"format": "pt"})
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = source.dtype
    config.save_pretrained(folder)
    if source.generation_config is not None:
        source.generation_config.save_pretrained(folder)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(folder)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
