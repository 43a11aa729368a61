"""Post-training quantization of LLMs (SignRound, RTN) into checkpoints that vLLM, SGLang and
transformers serve. ``python -m quantize --help`` for the command line."""

__version__ = "0.1.0"

# transformers loads auto_round checkpoints through this package from now on. Kept cheap (stdlib only):
# an installed quantize-llm is imported at every interpreter start (see integrations/transformers/autoload.py).
from quantize.integrations.transformers.autoload import register_on_import  # noqa: E402

register_on_import()
