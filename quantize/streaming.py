"""Models larger than host memory: blocks whose weights stay in the source shards until they are tuned.

:func:`load_streamed` builds the model with every parameter on the meta device (buffers such as rotary
tables are computed as usual), reads the tensors outside the blocks (embeddings, final norm, lm_head) and
returns a :class:`Streamer`, which hands the quantizer one block at a time and takes it back afterwards.
The tuned codes wait in the resume folder (quantize.resume) and the checkpoint is written from there shard
by shard (quantize.export.hf_folder), so peak host memory is about one block, one output shard and the
embeddings, however many blocks the model has; the calibration activations live on the compute device.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quantize.model import Blocks, UserError, find_blocks, resolve_model_path
from quantize.shards import shard_files, tensor_layout

# Stream without being asked when the model's weights take more than this share of the available memory.
AUTO_SHARE = 0.5


def deferred_parts(fn: Callable[[], dict], parts) -> dict[str, Callable]:
    """A function per name in ``parts`` giving that entry of ``fn()``. ``fn`` runs at the first call and its
    result is dropped once every part was taken, so a writer that holds these functions for every layer of
    a model holds one layer's tensors at a time (a part asked for again is computed again)."""
    result: dict = {}
    left = set(parts)

    def take(part: str):
        if not result:
            result.update(fn())
        value = result[part]
        left.discard(part)
        if not left:
            result.clear()
            left.update(parts)
        return value

    return {part: functools.partial(take, part) for part in parts}


class ShardReader:
    """Where each tensor of a model folder lies, and reading a few at a time: each shard is opened only
    while it is read, so its mapped pages leave memory again."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self.headers: dict[Path, dict] = {}
        for path in shard_files(folder):
            self.headers[path] = tensor_layout(path)  # also refuses truncated or corrupt shards
            self.files.update(dict.fromkeys(self.headers[path], path))
        if not self.files:
            raise UserError(f"{folder} holds no .safetensors weights: streaming reads safetensors shards; "
                            "quantize this model without --stream")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for path in dict.fromkeys(self.files[n] for n in names):
            with safe_open(str(path), "pt") as f:
                out.update({n: f.get_tensor(n) for n in names if self.files[n] == path})
        return out

    def deferred(self, name: str) -> Callable[[], torch.Tensor]:
        return lambda: self.read([name])[name]

    def fingerprint(self, calib_ids: torch.Tensor) -> str:
        """A hash of what a streamed run reads, without reading the weights: every shard's header and
        size (a changed or re-downloaded model changes them) and the calibration ids."""
        h = hashlib.blake2b(digest_size=16)
        for path, header in sorted(self.headers.items()):
            h.update(f"{path.name}:{path.stat().st_size}:{json.dumps(header, sort_keys=True)};".encode())
        h.update(calib_ids.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


@dataclass
class Streamer:
    """Gives the quantizer block ``i`` read from the shards (:meth:`load`) and frees it (:meth:`release`).
    ``rename`` maps the model's tensor names to the checkpoint's (quantize.moe.checkpoint_namer)."""

    reader: ShardReader
    blocks: Blocks
    rename: Callable[[str], str] = lambda name: name

    def load(self, i: int) -> None:
        block, prefix = self.blocks.modules[i], self.blocks.name(i) + "."
        stored = {k: self.rename(prefix + k) for k in block.state_dict()}
        tensors = self.reader.read(list(stored.values()))
        _check_finite(tensors)
        block.load_state_dict({k: tensors[name] for k, name in stored.items()}, assign=True)

    def release(self, i: int) -> None:
        self.blocks.modules[i].to("meta")

    def deferred(self, name: str) -> Callable[[], torch.Tensor]:
        """The tensor the model calls ``name``, read when called."""
        return self.reader.deferred(self.rename(name))

    def fingerprint(self, calib_ids: torch.Tensor) -> str:
        return self.reader.fingerprint(calib_ids)


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"weight {name} contains NaN or inf: the model is corrupted; re-download or re-export it")


def available_memory() -> int | None:
    """Bytes of host memory free for use now (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def should_stream(spec: str) -> tuple[bool, str]:
    """Whether to stream a model given by a local folder when the user did not say, and why (a hub id is
    not fetched here: ``--stream`` streams it from the hub cache)."""
    folder = Path(spec).expanduser()
    if not folder.is_dir() or not (folder / "config.json").exists():
        return False, ""
    size = sum(p.stat().st_size for p in shard_files(folder))
    free = available_memory()
    if free is None or size <= AUTO_SHARE * free:
        return False, ""
    return True, f"the weights ({size / 2**30:.1f} GiB) exceed half the available memory ({free / 2**30:.1f} GiB)"


def _local_folder(spec: str) -> Path:
    where, gguf = resolve_model_path(spec)
    if gguf:
        raise UserError(f"{gguf} is a GGUF file: streaming reads safetensors shards; quantize it without --stream")
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download

    try:  # the shards go to the hub cache on disk, not into memory
        return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:
        raise UserError(f"could not fetch {where!r} from the Hugging Face hub ({e.__class__.__name__}); download it "
                        "elsewhere and pass its local folder") from None


def _dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, d) if isinstance(d, str) else d


def _tied(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def load_streamed(spec: str):
    """(model, tokenizer, streamer): the model's blocks on the meta device, everything else read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from quantize.vlm import is_vlm

    folder = _local_folder(spec)
    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder)
    if (getattr(config, "quantization_config", None) or {}).get("quant_method"):
        raise UserError(f"{folder} is already quantized; streaming reads 16-bit models: pass the original model")
    if getattr(config, "is_encoder_decoder", False) or is_vlm(config):
        raise UserError(f"streaming handles decoder-only language models, not {config.model_type}: quantize it without --stream")
    from quantize.moe import checkpoint_namer, unfuse_experts

    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta; rotary tables computed
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(config))
    except ValueError as e:
        raise UserError(f"{config.model_type} is not a causal LM transformers can build: {e}") from None
    unfuse_experts(model)  # MoE experts as per-expert layers, named as checkpoints store them (quantize.moe)
    rename = checkpoint_namer(model)
    blocks = find_blocks(model)
    names = list(model.state_dict())
    missing = [rename(n) for n in names if rename(n) not in reader.files and not (n == "lm_head.weight" and _tied(config))]
    if missing:
        raise UserError(
            f"{folder} has no tensor {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which "
            f"{type(model).__name__} needs under that name: streaming reads each tensor by its checkpoint name; quantize "
            "this model without --stream"
        )
    outside = [n for n in names if not n.startswith(blocks.prefix + ".") and rename(n) in reader.files]
    tensors = reader.read([rename(n) for n in outside])
    _check_finite(tensors)
    model.load_state_dict({n: tensors[rename(n)] for n in outside}, strict=False, assign=True)
    if "lm_head.weight" not in reader.files and _tied(config):
        model.lm_head.weight = model.get_input_embeddings().weight
    model.eval()
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config._name_or_path = str(folder)
    return model, AutoTokenizer.from_pretrained(folder), Streamer(reader, blocks, rename)


def peak_host_memory() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

