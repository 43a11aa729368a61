"""transformers integration: ``AutoModelForCausalLM.from_pretrained(ckpt)`` loads auto_round
checkpoints through quantize.kernels, with Intel's ``auto_round`` package absent.

transformers ships its own "auto-round" entries, which call into Intel's package, and its public
``register_quantizer`` refuses names that exist; so :func:`register` sets the two registry entries
directly. It runs when transformers imports its quantizer registry, in every process where quantize-llm
is installed (unless ``QUANTIZE_LLM_NO_AUTOLOAD`` is set) or ``quantize`` is imported: see autoload.py.
"""

from __future__ import annotations


def register() -> None:
    from transformers.quantizers import auto

    from quantize.checkpoint import QUANT_METHOD
    from quantize.integrations.transformers.config import AutoRoundConfig
    from quantize.integrations.transformers.quantizer import AutoRoundQuantizer

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = AutoRoundConfig
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = AutoRoundQuantizer
