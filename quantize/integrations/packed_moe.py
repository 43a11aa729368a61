"""What the vLLM and SGLang MoE methods share: per-expert auto_round tensors in an engine's fused-experts layer.

Both engines build a MoE layer as one module holding every expert's gate+up (``w13``) and down (``w2``)
projections as 3-D parameters, and both loaders map the checkpoint's per-expert names
(``...experts.{e}.gate_proj.qweight``, Mixtral's ``w1``/``w3``/``w2``) onto them shard by shard, reading
``quant_method: group`` and ``is_transposed`` off each parameter. So, like the engines' own GPTQ MoE
methods, :func:`expert_parameters` registers ``w13_qweight`` / ``w13_qzeros`` / ``w13_scales`` and ``w2_*``
with one slot per expert in the checkpoint's packing (the output dimension last), which the loaders fill
unchanged for every layout this project writes (gptq, awq, native) and bits 2/3/4/8.

MX and NVFP4 experts (quantize.fp_layout) get their checkpoint tensors the same way, as compressed-tensors'
MoE methods register them: ``w13_weight_packed`` / ``w13_weight_scale`` (``quant_method: group``, output
dimension first) and the per-part scalars ``w13_weight_global_scale`` / ``w13_input_global_scale`` with a
slot for gate and one for up (``quant_method: tensor``), ``w2_*`` with one.

Compute: after loading, each projection gets the quantize.kernels kernel a linear layer of its shape would
get, with its working tensors prepared per expert (:func:`prepare_experts`); :func:`experts_forward` runs
the routed tokens expert by expert (only experts with tokens). Integer experts stay packed in memory; FP
ones hold what their kernel derives (fp_emulate: the weight dequantized into the activation dtype, the
input fake-quantized as the scheme says).
"""

from __future__ import annotations

import weakref

import torch

from quantize import weight_rules
from quantize.checkpoint import CheckpointConfig, ConfigError
from quantize.fp_layout import SCALARS, checkpoint_tensors, split_parts
from quantize.kernels import FPLinearSpec, LinearSpec, select_kernel
from quantize.packing import packed_shapes
from quantize.scheme import Scheme

PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")
TENSORS = ("qweight", "qzeros", "scales")
# The prepared layers experts_forward's custom op serves, by a key unique to each live layer (an op takes
# no module argument).
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def experts_scheme(config: CheckpointConfig, prefix: str, num_experts: int, engine: str) -> Scheme:
    """The one scheme every expert projection of MoE layer ``prefix`` has; refused otherwise (the engine
    holds a layer's experts in one tensor, so they cannot differ, nor be partly 16-bit)."""
    schemes = {}
    for e in range(num_experts):
        for p in PROJECTIONS:
            schemes[f"{prefix}.{e}.{p}"] = config.layer_scheme(f"{prefix}.{e}.{p}")
    kept = sorted(n for n, s in schemes.items() if s is None)
    if kept:
        raise ConfigError(
            f"MoE layer {prefix}: expert layers {kept[:3]}{'...' if len(kept) > 3 else ''} are stored 16-bit while others "
            f"are quantized; {engine} holds a layer's experts in one tensor: quantize all experts of a layer, or none"
        )
    distinct = set(schemes.values())
    if len(distinct) > 1:
        raise ConfigError(
            f"MoE layer {prefix}: its experts are quantized with different schemes ({', '.join(sorted(s.name for s in distinct))}); "
            f"{engine} holds a layer's experts in one tensor: re-quantize them with one scheme"
        )
    scheme = distinct.pop()
    if not scheme.integer_weight_only and not fp_experts(scheme):
        raise ConfigError(
            f"MoE layer {prefix}: its experts are {scheme.name}; the {engine} plugin serves integer, MX and NVFP4 "
            f"experts, not yet FP8 ones. Load this checkpoint with transformers (`import quantize`), or quantize "
            f"the model with another scheme (e.g. --scheme W4A16 or MXFP8) to serve it with {engine}"
        )
    return scheme


def fp_experts(scheme: Scheme) -> bool:
    """Whether experts of ``scheme`` hold the MX / NVFP4 tensors of quantize.fp_layout."""
    return weight_rules.rule_name(scheme) in ("mx_fp", "nv_fp")


def expert_parameters(scheme: Scheme, layout: str, prefix: str, num_experts: int, hidden: int, inter: int,
                      tp_size: int) -> dict[str, torch.nn.Parameter]:
    """Empty ``w13_*`` / ``w2_*`` parameters for ``num_experts`` experts of this rank (``inter`` columns each)."""
    s = scheme
    if s.group_size != -1 and (hidden % s.group_size or inter % s.group_size):
        raise ConfigError(f"MoE layer {prefix}: group_size {s.group_size} does not divide its inputs "
                          f"(hidden {hidden}, intermediate {inter} per rank): try a smaller tensor-parallel size")
    if fp_experts(s):
        return _fp_expert_parameters(s, num_experts, hidden, inter)
    if (inter * s.bits) % 32 or (hidden * s.bits) % 32:
        raise ConfigError(f"MoE layer {prefix}: {inter} intermediate columns x {s.bits} bits do not fill whole 32-bit words")
    if s.group_size == -1 and tp_size > 1:
        raise ConfigError(f"MoE layer {prefix}: per-channel (group_size -1) experts are served at tensor-parallel size 1 only")
    params = {}
    for stem, k, n in (("w13", hidden, 2 * inter), ("w2", inter, hidden)):
        groups = 1 if s.group_size == -1 else k // s.group_size
        for t, shape in packed_shapes(layout, s.bits, k, n, groups).items():
            dtype = torch.float16 if t == "scales" else torch.int32
            params[f"{stem}_{t}"] = torch.nn.Parameter(torch.empty(num_experts, *shape, dtype=dtype), requires_grad=False)
    return params


def _fp_expert_parameters(s: Scheme, num_experts: int, hidden: int, inter: int) -> dict[str, torch.nn.Parameter]:
    params = {}
    for stem, k, n, parts in (("w13", hidden, 2 * inter, 2), ("w2", inter, hidden, 1)):
        for t, (shape, dtype) in checkpoint_tensors(s, k, n).items():
            # a scalar per fused part: the engines' loaders put gate's in slot 0 and up's in slot 1
            full = ((num_experts, 2) if parts == 2 else (num_experts,)) if t in SCALARS else (num_experts, *shape)
            params[f"{stem}_{t}"] = torch.nn.Parameter(torch.empty(full, dtype=dtype), requires_grad=False)
    return params


def _prepare_fp(layer, stem: str, spec: FPLinearSpec, inter: int, kernel: str | None) -> tuple:
    """One FP projection's kernel and its per-expert states; the checkpoint tensors are dropped after (the
    kernel keeps what it derived, as an FP linear layer does)."""
    tensors = {t: getattr(layer, f"{stem}_{t}").data for t in checkpoint_tensors(spec.scheme, spec.in_features, spec.out_features)}
    chosen = select_kernel(spec, tensors["weight_scale"].device, kernel)
    rows = [inter, inter] if stem == "w13" else [spec.out_features]  # gate and up, or down alone
    states = [chosen.prepare(spec, split_parts({t: v[e] for t, v in tensors.items()}, rows))
              for e in range(len(tensors["weight_scale"]))]
    for t in tensors:
        delattr(layer, f"{stem}_{t}")
    return chosen, spec, states


def prepare_experts(layer, scheme: Scheme, layout: str, hidden: int, inter: int, dtype: torch.dtype,
                    kernel: str | None = None) -> None:
    """One quantize.kernels kernel per projection, its working tensors per expert (prepared once), as
    ``layer.moe_kernels``; ``kernel`` forces one, as for the linear layers."""
    layer.moe_kernels = {}
    layer.moe_dtype = dtype
    layer.moe_op_key = f"moe@{id(layer)}"  # how the custom op in experts_forward finds this layer
    _LAYERS[layer.moe_op_key] = layer
    for stem, (k, n) in {"w13": (hidden, 2 * inter), "w2": (inter, hidden)}.items():
        if fp_experts(scheme):
            layer.moe_kernels[stem] = _prepare_fp(layer, stem, FPLinearSpec(scheme, k, n, dtype), inter, kernel)
            continue
        spec = LinearSpec(scheme.bits, scheme.group_size, scheme.sym, layout, k, n, dtype)
        packed = {t: getattr(layer, f"{stem}_{t}").data for t in TENSORS}
        chosen = select_kernel(spec, packed["qweight"].device, kernel)
        states = []
        for e in range(packed["qweight"].shape[0]):
            state = {t: v[e] for t, v in packed.items()}
            state.update(chosen.prepare(spec, state["qweight"], state["qzeros"], state["scales"]))
            states.append(state)
        layer.moe_kernels[stem] = (chosen, spec, states)


class PackedMoEMethod:
    """The MoE method both engines get, mixed into each engine's ``FusedMoEMethodBase`` (as
    quantize.integrations.packed_linear.PackedLinearMethod is for linear layers). Each adapter sets
    ``scheme``, ``layout``, ``prefix`` and ``kernel``, names its engine's ``set_weight_attrs`` and says which
    tensor-parallel size a layer has (:meth:`tp_size`)."""

    scheme: Scheme
    layout: str
    prefix: str
    kernel: str | None
    set_weight_attrs = None  # the engine's (vLLM's wraps the loader on some platforms)

    def tp_size(self, layer) -> int:
        raise NotImplementedError

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        # "group" is both engines' FusedMoeWeightScaleSupported.GROUP: scales and zeros cut like the weights;
        # "tensor": one scalar per expert and part. Packed integer tensors lie input dimension first.
        group = {**extra_weight_attrs, "quant_method": "group", "is_transposed": not fp_experts(self.scheme)}
        scalar = {**extra_weight_attrs, "quant_method": "tensor"}
        params = expert_parameters(self.scheme, self.layout, self.prefix, num_experts, hidden_size,
                                   intermediate_size_per_partition, self.tp_size(layer))
        for name, p in params.items():
            layer.register_parameter(name, p)
            self.set_weight_attrs(p, scalar if name.split("_", 1)[1] in SCALARS else group)
        layer.moe_shape = (hidden_size, intermediate_size_per_partition, params_dtype)

    def process_weights_after_loading(self, layer) -> None:
        prepare_experts(layer, self.scheme, self.layout, *layer.moe_shape, self.kernel)


def check_activation(activation, prefix: str, router_weight_on_input: bool) -> None:
    if router_weight_on_input:
        raise ConfigError(f"MoE layer {prefix}: router weights applied on the input (Llama 4) are not served yet")
    act = str(activation or "silu").lower()
    if "silu" not in act:
        raise ConfigError(f"MoE layer {prefix}: activation {act} is not served yet (SiLU-gated experts only)")


def experts_forward(layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over each token's routed experts of ``weight * down(silu(gate(x)) * up(x))``, in float32, returned
    in ``x``'s dtype. ``expert_map``: global -> local expert ids (-1: another rank's expert).

    Called through the ``quantize_llm::moe_experts`` custom op, so that an engine that compiles its model
    (vLLM does, on the CPU too) sees one opaque call instead of tracing the data-dependent loop."""
    return torch.ops.quantize_llm.moe_experts(x, topk_weights, topk_ids, expert_map, layer.moe_op_key)


@torch.library.custom_op("quantize_llm::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
                 key: str) -> torch.Tensor:
    layer = _LAYERS[key]
    (k13, spec13, s13), (k2, spec2, s2) = layer.moe_kernels["w13"], layer.moe_kernels["w2"]
    inter = spec2.in_features
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    out = torch.zeros(x.shape[0], spec2.out_features, dtype=torch.float32, device=x.device)
    xs = x.to(layer.moe_dtype)
    # Inside a CUDA graph the routed experts cannot be read back to the host: there every local expert runs
    # on every token, weighted by its routing weight (zero where not routed). Graphs are captured for small
    # decode batches, where most experts are touched anyway.
    masked = x.is_cuda and torch.cuda.is_current_stream_capturing()
    for e in range(len(s13)) if masked else torch.unique(ids).tolist():
        if e < 0:
            continue
        if masked:
            token = torch.arange(x.shape[0], device=x.device)
            weight = ((ids == e) * topk_weights.float()).sum(1, keepdim=True)
        else:
            token, slot = torch.where(ids == e)
            weight = topk_weights[token, slot, None].float()
        h = k13.apply(spec13, s13[e], xs[token], None)
        h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, token, k2.apply(spec2, s2[e], h, None).float() * weight)
    return out.to(x.dtype)


@_moe_experts.register_fake
def _(x, topk_weights, topk_ids, expert_map, key):
    return torch.empty_like(x)
