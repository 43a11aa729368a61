"""vLLM plugin: serves every auto_round checkpoint this project (or Intel AutoRound) writes, on CPU and
CUDA, through quantize.kernels.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point (name ``quantize_llm``) in
each of its processes; it registers the "auto-round" quantization config, replacing vLLM's own
routing of auto_round checkpoints to its ``inc`` method. ``--quantization inc`` still selects vLLM's.
"""

PLUGIN_NAME = "quantize_llm"


def register() -> None:
    # Importing the module registers the config (register_quantization_config is idempotent per name).
    import quantize.integrations.vllm.config  # noqa: F401
