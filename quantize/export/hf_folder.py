"""The parts every Hugging Face-style format shares: config.json with its quantization_config,
safetensors weights, tokenizer and generation config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

# Shards as transformers writes them: one model.safetensors when it fits, else numbered files + an index.
MAX_SHARD = "5GB"


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: str = MAX_SHARD) -> None:
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].detach().cpu().contiguous() for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        write_json(folder / "model.safetensors.index.json", {"metadata": split.metadata, "weight_map": split.tensor_to_filename})


def write_hf_folder(source, folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    """Write ``tensors`` and the model's config (with ``quantization_config`` when given) into ``folder``."""
    write_weights(folder, tensors)
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
    from quantize.vlm import copy_processor_files

    copy_processor_files(getattr(source.config, "_name_or_path", None), folder)  # VLMs: AutoProcessor's files


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
