"""A model folder's safetensors shards: checked whole before anything reads them.

A download cut short or a copy that ran out of space leaves a shard shorter than its header says, and
an index can name a shard that is not there; transformers then fails deep inside loading (or, for some
truncations, only when a tensor is first touched) with a message that names neither the file nor the fix.
Reading each shard's header costs a few kilobytes per file, so it is done up front.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from quantize.model import UserError

INDEX = "model.safetensors.index.json"
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER = 100_000_000


def shard_files(folder: Path) -> list[Path]:
    """The shards the folder's index names (each must exist), else its *.safetensors files."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e}); download the model again") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"{index} names shard{'s' if len(missing) > 1 else ''} {', '.join(missing)}, missing from {folder}; "
                "download the model again (or copy the missing files)"
            )
        return [folder / f for f in files]
    return sorted(folder.glob("*.safetensors"))


def tensor_layout(path: Path) -> dict[str, dict]:
    """The header of one shard (tensor name -> dtype, shape, data_offsets), after checking that the file
    holds every byte it announces."""
    size = path.stat().st_size
    broken = f"{path} is truncated or corrupt"
    fix = "download or copy it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{broken} ({size} bytes, too short for a safetensors header); {fix}")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise UserError(f"{broken} (its header announces {length} bytes; the file has {size}); {fix}")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise UserError(f"{broken} (its header is not valid JSON); {fix}") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end > size:
        raise UserError(f"{broken}: it should hold {8 + length + end} bytes but has {size}; {fix}")
    return header


def check_shards(folder: Path) -> None:
    """Refuse, naming the file, a folder whose shards are missing, truncated or unreadable."""
    for path in shard_files(folder):
        tensor_layout(path)
