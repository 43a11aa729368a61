"""Post-training quantization of LLMs (SignRound, RTN) into checkpoints that vLLM, SGLang and
transformers serve. ``python -m quantize --help`` for the command line."""

__version__ = "0.1.0"


def _register_integrations() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from quantize.integrations.transformers import register

    register()


_register_integrations()
