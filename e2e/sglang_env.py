"""SGLang for the CPU tests: ``pip install --no-deps sglang==0.5.21`` (it pins our torch, 2.13) imports
its layers here, but pulls torchvision in at start-up (multimodal helpers), and PyPI's torchvision is a
CUDA build that does not load beside the CPU torch. While SGLang is imported, a stand-in answers every
``torchvision`` import with an inert module (nothing the linear layers touch uses it); afterwards the
stand-in is removed, so nothing else in the test run sees it."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

SGLANG_PIN = "sglang==0.5.21"


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] != "torchvision":
            return None
        return importlib.util.spec_from_loader(name, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Inert()

        module.__getattr__ = attribute
        return module

    def exec_module(self, module):
        pass


def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401

        return True
    except Exception:  # noqa: BLE001  (a CUDA build beside the CPU torch fails with RuntimeError or OSError)
        sys.modules.pop("torchvision", None)
        return False


def import_sglang(keep_stand_in: bool = False) -> str | None:
    """Import SGLang's layer modules; None on success, else why they cannot be imported.
    ``keep_stand_in``: leave the stand-in in place (a subprocess that goes on to import SGLang's models)."""
    if importlib.util.find_spec("sglang") is None:
        return f"SGLang is not installed (pip install --no-deps {SGLANG_PIN})"
    # transformers decides once whether torchvision exists; it must decide before the stand-in is there.
    import transformers.utils

    transformers.utils.is_torchvision_available()
    stand_in = None if _torchvision_loads() else _TorchvisionStandIn()
    if stand_in is not None:
        sys.meta_path.insert(0, stand_in)
    try:
        for name in ("sglang.srt.layers.quantization", "sglang.srt.layers.linear", "sglang.srt.layers.parameter"):
            importlib.import_module(name)
    except ImportError as e:
        return f"SGLang's layers do not import here ({e}); install {SGLANG_PIN} with --no-deps"
    finally:
        if stand_in is not None and not keep_stand_in:
            sys.meta_path.remove(stand_in)
            for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    return None
