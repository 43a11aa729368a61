"""Calibration data: text in, ``[nsamples, seqlen]`` token ids out."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from quantize import hub
from quantize.model import UserError
from quantize.requires import require

HUB_DEFAULT = "NeelNanda/pile-10k"  # AutoRound's default calibration set, used when the hub is reachable
BUNDLED = "bundled"  # public-domain Project Gutenberg passages shipped with the package


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("quantize.data").joinpath(name)))


def check_source(source: str) -> Path | None:
    """The file a calibration source names, or None for a hub dataset id. Checked before the model loads,
    so that a missing file, or a hub id without the package to load it, fails in a second, not minutes."""
    path = bundled_path("calib.txt") if source == BUNDLED else Path(source).expanduser()
    if path.is_file():
        return path
    if source.startswith((".", "/", "~")) or path.suffix:
        raise UserError(f"calibration file {source!r} does not exist: pass a .txt or .jsonl file, or a dataset id")
    require("datasets", "datasets", f"calibration dataset {source!r} (a hub id; a local .txt/.jsonl file needs nothing)")
    return None


def read_texts(source: str) -> list[str]:
    """Texts from a .txt file (passages split on blank lines), a .jsonl file (``text`` field), the
    bundled text, or a dataset id (needs the hub: Hugging Face, or ModelScope as quantize.hub chooses)."""
    path = check_source(source)
    if path is None:
        return _hub_texts(source)
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{n} is not a JSON object with a 'text' field ({e})") from e
    else:
        texts = raw.split("\n\n")
    return [t for t in texts if t.strip()]


def _hub_texts(dataset_id: str) -> list[str]:
    import datasets  # check_source has required it

    where = hub.resolve(dataset_id, "dataset")
    try:
        ds = datasets.load_dataset(where, split="train")
    except Exception as e:  # the hub raises many types: connection, missing dataset, auth
        raise UserError(
            f"could not load dataset {dataset_id!r} ({e.__class__.__name__}: {e}); without network access "
            f"pass a local .txt or .jsonl file, or --dataset {BUNDLED}"
        ) from e
    if "text" not in ds.column_names:
        raise UserError(f"dataset {dataset_id!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def calibration_ids(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 42) -> torch.Tensor:
    """``[nsamples, seqlen]`` ids: the texts, shuffled with ``seed``, joined with blank lines, tokenized,
    cut into consecutive windows of ``seqlen``; ``nsamples`` windows are drawn at random (same seed)."""
    texts = read_texts(source)
    if not texts:
        raise UserError(f"calibration source {source!r} holds no text")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=gen).tolist()
    # Tokenizing passage by passage keeps memory flat; the separator keeps passages apart.
    pieces = [texts[i] + "\n\n" for i in order]
    ids: list[int] = []
    needed = nsamples * seqlen * 4  # enough to draw windows from without tokenizing a whole corpus
    for start in range(0, len(pieces), 256):
        for row in tokenizer(pieces[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        if len(ids) >= needed:
            break
    windows = len(ids) // seqlen
    if windows < nsamples:
        raise UserError(
            f"calibration text {source!r} gives {len(ids)} tokens, {windows} windows of {seqlen}: fewer than "
            f"the {nsamples} samples asked for. Lower --nsamples or --seqlen, or give a longer text"
        )
    chunks = torch.tensor(ids[: windows * seqlen], dtype=torch.long).view(windows, seqlen)
    pick = torch.randperm(windows, generator=gen)[:nsamples]
    return chunks[pick.sort().values]
