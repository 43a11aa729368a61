"""The parts every Hugging Face-style format shares: config.json with its quantization_config,
safetensors weights, tokenizer and generation config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# At most this many bytes per shard. The writer streams each tensor to disk as it is computed, so a write
# holds one tensor in memory at a time, whatever the shard size (quantize.streaming defers the tensors).
MAX_SHARD = 2 * 10**9
# safetensors' dtype names
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class _ShardFile:
    """One safetensors file written tensor by tensor: the data goes out as each tensor arrives, after room
    kept for the header, which is written last and padded with spaces (the format allows trailing spaces),
    so no more than one tensor is ever in memory. ``room``: bytes kept for the header, enough for every
    name that may still come."""

    def __init__(self, path: Path, room: int):
        self.path, self.room = path, room
        self.f = open(path, "wb")
        self.f.seek(8 + room)
        self.header: dict = {"__metadata__": {"format": "pt"}}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self.size, self.size + nbytes]}
        if nbytes:
            self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.size += nbytes

    def close(self) -> None:
        text = json.dumps(self.header, separators=(",", ":")).encode()
        if len(text) > self.room:  # cannot happen with the room write_weights keeps; refuse rather than corrupt
            raise RuntimeError(f"{self.path}: header of {len(text)} bytes exceeds the {self.room} kept for it")
        self.f.seek(0)
        self.f.write(self.room.to_bytes(8, "little") + text + b" " * (self.room - len(text)))
        self.f.close()


def _header_room(names) -> int:
    # Per entry: the name, its dtype, a shape of up to 4 dimensions and two offsets of up to 13 digits each.
    return -(-(128 + sum(len(n.encode()) + 120 for n in names)) // 8) * 8


def write_weights(folder: Path, tensors: dict, max_shard_size: int = MAX_SHARD) -> None:
    """Write ``tensors`` (name -> tensor, or a zero-argument function giving one: computed only when it is
    written) as transformers does: one model.safetensors when it fits, else numbered shards and an index.
    Each tensor is written as soon as it is computed and then dropped (:class:`_ShardFile`)."""
    names = list(tensors)
    shards: list[Path] = []  # written so far, under temporary names until their count is known
    weight_map: dict[str, int] = {}
    total = 0
    current: _ShardFile | None = None

    def start(i: int) -> _ShardFile:
        stem = "model" if not shards else f"model-{len(shards) + 1:05d}"
        shard = _ShardFile(folder / f"{stem}.safetensors.part", _header_room(names[i:]))
        shards.append(shard.path)
        return shard

    try:
        for i, name in enumerate(names):
            value = tensors[name]
            t = (value() if callable(value) else value).detach().cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            if current is None or (current.size and current.size + nbytes > max_shard_size):
                if current is not None:
                    current.close()
                current = start(i)
            current.add(name, t)
            del t
            weight_map[name] = len(shards)
            total += nbytes
        current = current or start(len(names))
        current.close()
    except BaseException:
        if current is not None:
            current.f.close()
        raise
    if len(shards) == 1:
        shards[0].rename(folder / "model.safetensors")
        return
    n = len(shards)
    files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for path, filename in zip(shards, files):
        path.rename(folder / filename)
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": {k: files[i - 1] for k, i in weight_map.items()}})


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
