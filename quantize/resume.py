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

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


@dataclass
class Carry:
    """What the next block needs: its inputs (tuning and full-precision, the same tensor when shared)."""

    next_block: int
    q_inputs: torch.Tensor
    fp_inputs: torch.Tensor
    generator_state: torch.Tensor


class ResumeState:
    """The resume folder of one run. :func:`open_resume` makes it; the quantizer records each block."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _block_path(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.safetensors"

    def save_block(self, i: int, weights: dict[str, QuantizedWeight], losses: tuple[float, float] | None,
                   q_inputs: torch.Tensor, fp_inputs: torch.Tensor, generator: torch.Generator) -> None:
        """Block ``i`` is finished: its weights first, then the carry that points past it."""
        try:
            self._save_block(i, weights, losses, q_inputs, fp_inputs, generator)
        except OSError as e:
            raise UserError(
                f"cannot save the resume state in {self.folder} ({e.strerror or e}); free some space and run the same "
                f"command again: it resumes from block {i + 1}"
            ) from None

    def _save_block(self, i, weights, losses, q_inputs, fp_inputs, generator) -> None:
        tensors, schemes = {}, {}
        for name, w in weights.items():
            tensors.update({f"{name}.q": w.q, f"{name}.scales": w.scales, f"{name}.zeros": w.zeros})
            tensors.update({f"{name}.extra.{k}": t for k, t in w.extra.items()})  # FP schemes' fixed scales
            schemes[name] = asdict(w.scheme)
        _atomic_save(tensors, self._block_path(i), {"schemes": json.dumps(schemes), "losses": json.dumps(losses)})
        carry = {"q_inputs": q_inputs.contiguous(), "generator_state": generator.get_state()}
        if fp_inputs is not q_inputs:
            carry["fp_inputs"] = fp_inputs.contiguous()
        _atomic_save(carry, self.folder / CARRY, {"next_block": str(i + 1)})

    def load(self, device: torch.device) -> tuple[Carry | None, dict[str, QuantizedWeight], list[tuple[float, float]]]:
        """The carry (None: no block finished yet), the finished blocks' weights and their losses."""
        path = self.folder / CARRY
        if not path.exists():
            return None, {}, []
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            next_block = int(f.metadata()["next_block"])
        t = load_file(str(path), device=str(device))
        q = t["q_inputs"]
        carry = Carry(next_block, q, t.get("fp_inputs", q), t["generator_state"].cpu())
        weights, losses = {}, []
        for i in range(next_block):
            block = self._block_path(i)
            if not block.exists():
                raise UserError(f"{self.folder} is incomplete ({block.name} is missing): pass --overwrite to start over")
            with safe_open(str(block), "pt") as f:
                meta = f.metadata()
                keys = list(f.keys())
                for name, scheme in json.loads(meta["schemes"]).items():
                    extra = {k[len(name) + 7:]: f.get_tensor(k) for k in keys if k.startswith(f"{name}.extra.")}
                    weights[name] = QuantizedWeight(f.get_tensor(f"{name}.q"), f.get_tensor(f"{name}.scales"),
                                                    f.get_tensor(f"{name}.zeros"), Scheme(**scheme), extra)
                block_losses = json.loads(meta["losses"])
                if block_losses is not None:
                    losses.append(tuple(block_losses))
        return carry, weights, losses

    def remove(self) -> None:
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
