"""The SGLang plugin's MoE method: per-expert auto_round tensors in SGLang's ``FusedMoE`` layer, through
what both engines share (quantize.integrations.packed_moe): the parameters SGLang's expert loader fills
(``quant_method: group``, ``is_transposed``, as for its own GPTQ MoE method), one quantize.kernels kernel
per projection, the routed tokens run expert by expert. SGLang's own auto-round MoE path serves 4/8-bit
sym experts only (Marlin or its Triton WNA16 kernel); this one serves every bit width and layout we write.
"""

from __future__ import annotations

from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase
from sglang.srt.utils import set_weight_attrs

from quantize.checkpoint import ConfigError
from quantize.integrations.packed_moe import PackedMoEMethod, check_activation, experts_forward
from quantize.scheme import Scheme


class AutoRoundMoEMethod(PackedMoEMethod, FusedMoEMethodBase):
    """Packed per-expert tensors in, each expert computed by quantize.kernels."""

    set_weight_attrs = staticmethod(set_weight_attrs)

    def __init__(self, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        super().__init__()
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.kernel = kernel

    def tp_size(self, layer) -> int:
        return getattr(layer, "moe_tp_size", 1)

    def create_weights(self, layer, *args, **kwargs) -> None:
        if getattr(layer, "moe_ep_size", 1) > 1:
            raise ConfigError(f"MoE layer {self.prefix}: expert parallelism is not served yet: drop --ep-size")
        super().create_weights(layer, *args, **kwargs)

    def create_moe_runner(self, layer, moe_runner_config) -> None:
        check_activation(moe_runner_config.activation, self.prefix, moe_runner_config.apply_router_weight_on_input)
        self.moe_runner_config = moe_runner_config

    def apply(self, layer, dispatch_output) -> StandardCombineInput:
        topk = dispatch_output.topk_output
        out = experts_forward(layer, dispatch_output.hidden_states, topk.topk_weights, topk.topk_ids)
        scale = self.moe_runner_config.routed_scaling_factor
        return StandardCombineInput(hidden_states=out if not scale else out * scale)
