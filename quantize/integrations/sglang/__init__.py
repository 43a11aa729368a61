"""SGLang plugin: serves every auto_round checkpoint this project (or Intel AutoRound) writes, with no
``--quantization`` flag and no code change, through quantize.kernels (and SGLang's Marlin on CUDA).

SGLang calls :func:`register` through the ``sglang.srt.plugins`` entry point (name ``quantize_llm``) in
every one of its processes (launcher, engine, each scheduler, detokenizer). SGLang has no registration
function for quantization configs: its registry is the plain dict ``QUANTIZATION_METHODS`` (and the
CPU subset ``CPU_QUANTIZATION_METHODS``), so "auto-round" is pointed at our config there; its parallel
linear layers pick the v2 weight loader (the one that shards packed parameters) for the linear-method
class names listed in ``WEIGHT_LOADER_V2_SUPPORTED``, so ours is added to that list.
``SGLANG_PLUGINS`` (a comma-separated allow-list of plugin names) can leave it out.
"""

PLUGIN_NAME = "quantize_llm"


def register() -> None:
    from sglang.srt.layers import linear, quantization

    from quantize.checkpoint import QUANT_METHOD
    from quantize.integrations.sglang.config import AutoRoundSglangConfig
    from quantize.integrations.sglang.linear import AutoRoundFPLinearMethod, AutoRoundLinearMethod

    quantization.QUANTIZATION_METHODS[QUANT_METHOD] = AutoRoundSglangConfig
    quantization.CPU_QUANTIZATION_METHODS[QUANT_METHOD] = AutoRoundSglangConfig
    for method in (AutoRoundLinearMethod, AutoRoundFPLinearMethod):
        if method.__name__ not in linear.WEIGHT_LOADER_V2_SUPPORTED:
            linear.WEIGHT_LOADER_V2_SUPPORTED.append(method.__name__)
