"""Write a folder so that it appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from quantize.model import UserError


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """The output folder, refused before any work when it exists (without ``overwrite``) or its parent
    cannot be written."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise UserError(f"output folder {path} already exists: choose another --output_dir or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write in {path.parent} ({e.strerror or e}): choose a writable --output_dir") from None
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path`` (replacing an old
    folder when ``overwrite``), on failure it is deleted, so an interrupted run leaves nothing that
    looks like a finished checkpoint."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = str(e.filename).replace(str(tmp), str(path)) if e.filename else path
        raise UserError(f"writing {path} failed at {where}: {e.strerror or e}; nothing was left at {path}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
