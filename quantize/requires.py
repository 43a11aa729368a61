"""Optional packages: imported where a command needs them, with a clear error naming the pip command."""

from __future__ import annotations

import importlib
import shlex
from types import ModuleType

from quantize.model import UserError

# (module, pip requirement) of the optional packages more than one place needs.
GGUF = ("gguf", "gguf>=0.10")  # reading .gguf models, writing --format gguf
COMPRESSED_TENSORS = ("compressed_tensors", "compressed-tensors>=0.17")  # writing and loading llm_compressor checkpoints
# What transformers imports to load a checkpoint of each quant_method (auto-round loads through quantize.kernels).
LOADERS = {
    "compressed-tensors": [COMPRESSED_TENSORS],
    "gptq": [("optimum", "optimum"), ("gptqmodel", "gptqmodel")],
    "awq": [("gptqmodel", "gptqmodel")],
}


def require(module: str, pip: str, why: str) -> ModuleType:
    """``import module``, or a :class:`UserError` saying what needs it and how to install it. ``pip``:
    the requirement to install (``"gguf>=0.10"``); ``why``: what needs it (``"--format gguf"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # The import error's text tells "not installed" from "installed but broken" (a dependency missing).
        raise UserError(f"{why} needs the {module!r} package ({e}): pip install {shlex.quote(pip)}") from e
