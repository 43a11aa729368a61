"""The parts every Hugging Face-style format shares: config.json with its quantization_config,
safetensors weights, tokenizer and generation config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# At most this many bytes per shard: also the most a checkpoint write holds in memory at once when its
# tensors are deferred (quantize.streaming), so it stays well under the host memory of a streamed run.
MAX_SHARD = 2 * 10**9


def write_weights(folder: Path, tensors: dict, max_shard_size: int = MAX_SHARD) -> None:
    """Write ``tensors`` (name -> tensor, or a zero-argument function giving one: computed only when its
    shard is written) as transformers does: one model.safetensors when it fits, else numbered shards and an
    index. Shards fill in order and are written as they fill, so at most one shard is in memory."""
    shards: list[Path] = []  # written so far, under temporary names until their count is known
    weight_map: dict[str, int] = {}
    pending, size, total = {}, 0, 0

    def flush(path: Path):
        save_file(pending, path, metadata={"format": "pt"})
        shards.append(path)
        pending.clear()

    for name, value in tensors.items():
        t = (value() if callable(value) else value).detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_size:
            flush(folder / f"model-{len(shards) + 1:05d}.safetensors.part")
            size = 0
        pending[name], size, total = t, size + nbytes, total + nbytes
        weight_map[name] = len(shards) + 1
    if not shards:
        return flush(folder / "model.safetensors")
    flush(folder / f"model-{len(shards) + 1:05d}.safetensors.part")
    n = len(shards)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for path, filename in zip(shards, names):
        path.rename(folder / filename)
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": {k: names[i - 1] for k, i in weight_map.items()}})


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
