"""Where a model or dataset id comes from: the Hugging Face hub (transformers and datasets fetch ids
themselves) or ModelScope, chosen like Intel's AutoRound does, with ``AR_USE_MODELSCOPE=1`` (the CLI's
``--modelscope`` sets it). A ModelScope id is downloaded here, and its local folder loaded as any other."""

from __future__ import annotations

import os
import socket

from quantize.model import UserError
from quantize.requires import require

MODELSCOPE_ENV = "AR_USE_MODELSCOPE"


def use_modelscope() -> bool:
    # AutoRound's reading of the variable (auto_round/envs.py): "1" or "true", any case.
    return os.environ.get(MODELSCOPE_ENV, "").lower() in ("1", "true")


def resolve(repo_id: str, kind: str) -> str:
    """What to load for a hub id of ``kind`` ("model" or "dataset"): the id itself for Hugging Face, or the
    folder ModelScope downloaded it to. Callers pass ids only: local paths never reach a hub."""
    if not use_modelscope():
        return repo_id
    modelscope = require("modelscope", "modelscope", f"fetching {repo_id!r} from ModelScope (--modelscope, {MODELSCOPE_ENV})")
    download = modelscope.dataset_snapshot_download if kind == "dataset" else modelscope.snapshot_download
    try:
        return download(repo_id)
    except Exception as e:  # the hub client raises many types: connection, missing repo, auth
        raise UserError(
            f"could not download {kind} {repo_id!r} from ModelScope ({e.__class__.__name__}: {e}); check the id "
            f"and the network, pass a local path instead, or drop --modelscope / {MODELSCOPE_ENV} to use Hugging Face"
        ) from e


def huggingface_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
