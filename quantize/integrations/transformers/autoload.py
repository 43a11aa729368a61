"""Registers the transformers integration when transformers loads its quantizer registry.

``import quantize`` calls :func:`register_on_import`; an installed quantize-llm also does at interpreter
start, through the ``quantize-llm.pth`` file in site-packages (which imports ``quantize`` unless
``QUANTIZE_LLM_NO_AUTOLOAD`` is set), so ``from_pretrained`` loads auto_round checkpoints through this
package in scripts that never import it. Stdlib only, as it runs in every interpreter of the environment:
the registration itself, which imports torch and transformers, waits until transformers is being imported.
"""

import sys

from quantize.integrations.transformers import register  # its package imports nothing: still stdlib only

REGISTRY = "transformers.quantizers.auto"  # holds the two mappings that register() sets


def register_on_import() -> None:
    """Registers now if transformers' quantizer registry is loaded, else as soon as it is."""
    if REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())  # ahead of the finder that will find the module


class _RegistryFinder:
    """Finds nothing itself: gives the registry module's spec a loader that registers once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)  # one module, once; and the search below must not come back here
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # create_module, get_source, ...: the real loader's
        return getattr(self.loader, name)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self.loader  # leave no trace of the hook
        try:
            register()
        except Exception as e:  # a broken registration must not break transformers for every program
            import warnings

            warnings.warn(f"quantize-llm could not register its auto-round loader with transformers ({e!r}); "
                          "transformers' own auto-round support stays in place", stacklevel=2)
