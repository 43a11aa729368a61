"""Resume an interrupted quantization from its first unfinished block.

While a run tunes, a folder beside the output (``.NAME.resume``) holds a manifest (the run's settings and
a fingerprint of its inputs), one file per finished block (that block's integer weights and losses) and
the carry (the activations entering the next block and the random generator's state), each written
whole by rename. Running the same command again after a crash, ``kill -9`` or Ctrl-C continues where it
stopped and, having the same activations and generator state, produces the checkpoint an uninterrupted
run would have, byte for byte. Settings or inputs that differ refuse to resume (``--overwrite`` starts
over). The folder is removed once the checkpoint is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantize.model import UserError
from quantize.scheme import Scheme
from quantize.signround import QuantizedWeight

VERSION = 1
MANIFEST = "manifest.json"
CARRY = "carry.safetensors"


class Stopped(UserError):
    """Ctrl-C during a run that keeps resume state: it stopped after a finished block."""


def resume_dir(output_dir: Path) -> Path:
    return output_dir.with_name(f".{output_dir.name}.resume")


def fingerprint(model: torch.nn.Module, calib_ids: torch.Tensor) -> str:
    """A hash of what the run reads: every parameter and buffer of the model and the calibration ids."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*model.state_dict().items(), ("calibration ids", calib_ids)]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


# safetensors' names of the dtypes a carry holds
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8", torch.int64: "I64"}
_CHUNK = 64 * 2**20  # bytes copied off the device at a time


def _save_streamed(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """``save_file`` without a host copy of the whole: a 14B model's cached activations are gigabytes on
    the GPU, and the host should hold a chunk of them at a time. Same file format (safetensors)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            flat = t.contiguous().view(-1).view(torch.uint8)
            for chunk in flat.split(_CHUNK):
                f.write(chunk.cpu().numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_streamed(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of ``path`` straight onto ``device``, a slice of rows at a time; and its metadata."""
    from safetensors import safe_open

    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            shape = sl.get_shape()
            t = out[name] = torch.empty(shape, dtype=dtypes[sl.get_dtype()], device=device)
            rows = max(1, _CHUNK // max(1, t[:1].numel() * t.element_size())) if shape else 0
            for start in range(0, shape[0] if shape else 0, rows):
                t[start:start + rows].copy_(sl[start:start + rows])
        return out, f.metadata()


@dataclass
class Carry:
    """What the next block needs: its inputs (tuning and full-precision, the same tensor when shared)."""

    next_block: int
    q_inputs: torch.Tensor
    fp_inputs: torch.Tensor
    generator_state: torch.Tensor


@functools.lru_cache(maxsize=1)
def _open_block(path: str, mtime_ns: int, size: int):
    """One block file held open while the writer reads its layers in turn: parsing its header per tensor
    took 1.5 ms, a minute for a 48-layer, 128-expert model. Keyed by the file's stamp: a rewritten file is
    opened anew."""
    from safetensors import safe_open

    return safe_open(path, "pt")


class StoredWeight:
    """A finished layer's :class:`QuantizedWeight` left in its block file until its tensors are read: a
    streamed run writes the checkpoint from these, one layer at a time."""

    def __init__(self, path: Path, name: str, scheme: Scheme, extra: dict[str, torch.Tensor]):
        self.path, self.name, self.scheme, self.extra = path, name, scheme, extra

    def _get(self, part: str) -> torch.Tensor:
        st = self.path.stat()
        return _open_block(str(self.path), st.st_mtime_ns, st.st_size).get_tensor(f"{self.name}.{part}")

    q = property(lambda self: self._get("q"))
    scales = property(lambda self: self._get("scales"))
    zeros = property(lambda self: self._get("zeros"))

    def load(self) -> QuantizedWeight:
        return QuantizedWeight(self.q, self.scales, self.zeros, self.scheme, self.extra)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.load().dequantize(dtype)

    def to(self, device) -> QuantizedWeight:
        return self.load().to(device)


class ResumeState:
    """The resume folder of one run. :func:`open_resume` makes it; the quantizer records each block.

    Each finished block's weights are saved at once; the carry (the next block's inputs, gigabytes for a
    large model) only when the time since the last one is at least ``CARRY_PACE`` times what writing it
    took, so saving it costs at most about a tenth of the run. A crash resumes from the last carry and
    tunes the blocks after it again, to the same result."""

    CARRY_PACE = 9

    def __init__(self, folder: Path):
        self.folder = folder
        self._carry_cost = 0.0
        self._carry_time = float("-inf")

    def _block_path(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.safetensors"

    def save_block(self, i: int, weights: dict[str, QuantizedWeight], losses: tuple[float, float] | None,
                   q_inputs: torch.Tensor, fp_inputs: torch.Tensor, generator: torch.Generator, force_carry: bool = False) -> None:
        """Block ``i`` is finished: its weights first, then (when due, or ``force_carry``) the carry that points past it."""
        try:
            self._save_weights(i, weights, losses)
            if force_carry or time.monotonic() - self._carry_time >= self.CARRY_PACE * self._carry_cost:
                start = time.monotonic()
                self._save_carry(i, q_inputs, fp_inputs, generator)
                self._carry_time = time.monotonic()
                self._carry_cost = self._carry_time - start
        except OSError as e:
            raise UserError(
                f"cannot save the resume state in {self.folder} ({e.strerror or e}); free some space and run the same "
                f"command again: it resumes where it stopped"
            ) from None

    def _save_weights(self, i, weights, losses) -> None:
        tensors, schemes = {}, {}
        for name, w in weights.items():
            tensors.update({f"{name}.q": w.q, f"{name}.scales": w.scales, f"{name}.zeros": w.zeros})
            tensors.update({f"{name}.extra.{k}": t for k, t in w.extra.items()})  # FP schemes' fixed scales
            schemes[name] = asdict(w.scheme)
        _atomic_save(tensors, self._block_path(i), {"schemes": json.dumps(schemes), "losses": json.dumps(losses)})

    def _save_carry(self, i, q_inputs, fp_inputs, generator) -> None:
        carry = {"q_inputs": q_inputs, "generator_state": generator.get_state()}
        if fp_inputs is not q_inputs:
            carry["fp_inputs"] = fp_inputs
        _save_streamed(carry, self.folder / CARRY, {"next_block": str(i + 1)})

    def load(self, device: torch.device, weights: bool = True) -> tuple[Carry | None, dict[str, QuantizedWeight], list[tuple[float, float]]]:
        """The carry (None: no block finished yet), the finished blocks' weights (none unless ``weights``:
        a streamed run reads them when it writes the checkpoint) and their losses."""
        path = self.folder / CARRY
        if not path.exists():
            return None, {}, []
        t, meta = _load_streamed(path, device)
        next_block = int(meta["next_block"])
        q = t["q_inputs"]
        carry = Carry(next_block, q, t.get("fp_inputs", q), t["generator_state"].cpu())
        stored, losses = self.stored(next_block)
        return carry, {n: w.load() for n, w in stored.items()} if weights else {}, losses

    def stored(self, n_blocks: int) -> tuple[dict[str, StoredWeight], list[tuple[float, float]]]:
        """The weights of blocks ``0 .. n_blocks-1``, left on disk, and their losses."""
        from safetensors import safe_open

        weights, losses = {}, []
        for i in range(n_blocks):
            block = self._block_path(i)
            if not block.exists():
                raise UserError(f"{self.folder} is incomplete ({block.name} is missing): pass --overwrite to start over")
            with safe_open(str(block), "pt") as f:
                meta = f.metadata()
                extras: dict[str, list[str]] = {}
                for k in f.keys():
                    if ".extra." in k:
                        extras.setdefault(k.split(".extra.")[0], []).append(k)
                for name, scheme in json.loads(meta["schemes"]).items():
                    extra = {k[len(name) + 7:]: f.get_tensor(k) for k in extras.get(name, ())}
                    weights[name] = StoredWeight(block, name, Scheme(**scheme), extra)
                block_losses = json.loads(meta["losses"])
                if block_losses is not None:
                    losses.append(tuple(block_losses))
        return weights, losses

    def remove(self) -> None:
        _open_block.cache_clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def open_resume(folder: Path, settings: dict, inputs: str, overwrite: bool) -> tuple[ResumeState, bool]:
    """The resume folder for a run with these ``settings`` (JSON-able) and ``inputs`` (a fingerprint),
    and whether it resumes an earlier run. Refuses, saying why, a folder left by a different run."""
    manifest = {"version": VERSION, "settings": settings, "inputs": inputs}
    manifest = json.loads(json.dumps(manifest))  # as it reads back from disk
    path = folder / MANIFEST
    if folder.exists() and not overwrite and path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}): pass --overwrite to start over") from None
        if old.get("version") != VERSION:
            raise UserError(f"{folder} was left by another version of quantize-llm: pass --overwrite to start over")
        if old["settings"] != manifest["settings"]:
            changed = ", ".join(_differences(old["settings"], manifest["settings"]))
            raise UserError(
                f"{folder} holds an interrupted run with other settings (changed: {changed}); run the same command "
                f"again to resume it, or pass --overwrite to start over"
            )
        if old["inputs"] != manifest["inputs"]:
            raise UserError(
                f"{folder} holds an interrupted run of other inputs (the model's weights or the calibration text "
                f"changed since); pass --overwrite to start over"
            )
        return ResumeState(folder), True
    if folder.exists():
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True)
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the resume state in {folder}: {e.strerror or e}") from None
    return ResumeState(folder), False
