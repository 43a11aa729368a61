"""Mixture-of-experts layers: transformers 5's fused expert tensors as per-expert nn.Linear layers.

transformers 5 stores a MoE layer's experts as two 3-D parameters, ``experts.gate_up_proj`` ``(E, 2I, H)``
and ``experts.down_proj`` ``(E, H, I)``, not as nn.Linear. Like Intel AutoRound 0.16 (its ``linear_loop``
experts), :func:`unfuse_experts` replaces every such module with :class:`UnfusedExperts`: numbered expert
containers holding ``gate_proj``/``up_proj``/``down_proj`` nn.Linear layers (``w1``/``w3``/``w2`` for
models whose checkpoints name them so, e.g. Mixtral), whose forward is transformers' eager loop over
the experts the router picked. Everything that works on nn.Linear then works on experts: the layer plan,
SignRound (each expert is tuned on the tokens the real router sends it; an expert that no calibration
token reaches gets no gradient and keeps its round-to-nearest weights), the checkpoint's per-expert
names (``...experts.{e}.gate_proj.qweight``, the layout Intel's loader and vLLM's FusedMoE loader read)
and the transformers loader, which unfuses the model skeleton the same way before the weights load.

Router gates stay 16-bit: transformers 5 keeps them as router modules with a ``weight`` parameter (not
nn.Linear), so they are never in the plan; nn.Linear gates (a shared expert's ``shared_expert_gate``,
older ``mlp.gate`` layers) are kept by :func:`moe_keep`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from quantize.model import UserError

# in-memory projection names per checkpoint naming: (gate, up, down)
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
W1_W3_W2 = ("w1", "w3", "w2")
# grouped matrix product over row ranges: public in torch 2.13, private in torch 2.11
_GROUPED_MM = getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# nn.Linear layers that route tokens (or gate a shared expert): quantizing them breaks loaders (sglang #16716)
ROUTER_PATTERN = re.compile(r"(^|\.)(gate|router|shared_expert_gate|shared_experts_gate)$")


class ExpertContainer(nn.Module):
    """One expert: its gate, up and down projections as attributes (names as in the checkpoint)."""


class UnfusedExperts(nn.Module):
    """A MoE layer's experts as per-expert nn.Linear layers; forward is transformers' eager experts loop
    (same arguments: flat hidden states, top-k expert indices and weights)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module, names=GATE_UP_DOWN,
                 dtype=None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.names = tuple(names)
        self.act_fn = act_fn
        gate, up, down = self.names
        for e in range(num_experts):
            expert = ExpertContainer()
            expert.add_module(gate, _linear(hidden, intermediate, dtype, device))
            expert.add_module(up, _linear(hidden, intermediate, dtype, device))
            expert.add_module(down, _linear(intermediate, hidden, dtype, device))
            self.add_module(str(e), expert)
        # tokens routed to each expert since the last reset_routed(): which experts calibration reached
        self.routed = None

    def expert(self, e: int) -> ExpertContainer:
        return self._modules[str(e)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        with torch.no_grad():
            # (token, slot) pairs sorted by expert, then slot, then token (transformers' loop order); one
            # host sync for all experts' counts, where a loop of torch.where syncs once per expert.
            picked = top_k_index.clamp(max=self.num_experts).t().reshape(-1)
            order = torch.argsort(picked * (tokens * top_k) + torch.arange(tokens * top_k, device=picked.device))
            counts = torch.bincount(picked, minlength=self.num_experts + 1)[: self.num_experts]
            self.routed = counts if self.routed is None else self.routed + counts
            pos, token = order // tokens, order % tokens
            starts = [0, *torch.cumsum(counts, 0).tolist()]
        if starts[-1] == 0:  # no token reached an expert here (an empty batch)
            return torch.zeros_like(hidden_states)
        dtype = self._grouped_dtype(hidden_states)
        if dtype is not None:
            return self._grouped(hidden_states, top_k_weights, token[: starts[-1]], pos[: starts[-1]], counts, dtype)
        gate_name, up_name, down_name = self.names
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            if starts[e + 1] == starts[e]:
                continue
            expert = self.expert(e)
            t, p = token[starts[e] : starts[e + 1]], pos[starts[e] : starts[e + 1]]
            x = hidden_states[t]
            h = self.act_fn(getattr(expert, gate_name)(x)) * getattr(expert, up_name)(x)
            h = getattr(expert, down_name)(h) * top_k_weights[t, p, None]
            out.index_add_(0, t, h.to(out.dtype))
        return out

    def _grouped_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype of the grouped path's products, or None for the loop over experts: the grouped path
        computes the same sums in three grouped matrix products (one launch each, where the loop makes ten
        per expert: a 128-expert layer's tuning step was bound by launches), but only plain nn.Linear
        experts' weights can be stacked; hooked layers (activation quantization, input statistics) and
        packed layers (a loaded checkpoint) need their own forward."""
        if _GROUPED_MM is None:
            return None
        for e in range(self.num_experts):
            for name in self.names:
                lin = getattr(self.expert(e), name)
                if type(lin) is not nn.Linear or lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks:
                    return None
        dev = x.device.type
        gate = getattr(self.expert(0), self.names[0])
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else gate.weight.dtype
        if gate.in_features % 8 or gate.out_features % 8:  # the kernels need rows 16-byte aligned
            return None
        if dev == "cuda":  # CUDA's grouped GEMM: bf16, Hopper and newer (torch 2.11)
            if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
                return None
        elif dev != "cpu":
            return None
        return dtype

    def _grouped(self, hidden_states, top_k_weights, token, pos, counts, dtype) -> torch.Tensor:
        # each projection's experts stacked (E, N, K): under functional_call, the tuned weights
        w = [torch.stack([getattr(self.expert(e), n).weight for e in range(self.num_experts)]).to(dtype) for n in self.names]
        offs = torch.cumsum(counts, 0, dtype=torch.int32)

        def mm(x, weight):
            return _GROUPED_MM(x, weight.transpose(1, 2), offs=offs)

        x = hidden_states[token].to(dtype)
        h = self.act_fn(mm(x, w[0])) * mm(x, w[1])
        h = mm(h, w[2]) * top_k_weights[token, pos, None]
        return torch.zeros_like(hidden_states).index_add_(0, token, h.to(hidden_states.dtype))


def _linear(k: int, n: int, dtype, device) -> nn.Linear:
    # No initialisation: the weights are copied in (or loaded) right after.
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = k, n
    lin.weight = nn.Parameter(torch.empty(n, k, dtype=dtype, device=device), requires_grad=False)
    lin.register_parameter("bias", None)
    return lin


def _is_fused_experts(module: nn.Module) -> bool:
    p = module._parameters
    return (
        isinstance(p.get("gate_up_proj"), torch.Tensor) and p["gate_up_proj"].dim() == 3
        and isinstance(p.get("down_proj"), torch.Tensor) and p["down_proj"].dim() == 3
    )


def expert_names(model: nn.Module) -> tuple[str, str, str]:
    """The projection names the model's checkpoints use for one expert: transformers' conversion mapping
    says (Mixtral's ``.experts.*.w1.weight`` -> w1/w3/w2; gate_proj/up_proj/down_proj otherwise)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001 - no mapping (older transformers, custom code): the common names
        return GATE_UP_DOWN
    for c in conversions:
        if any(".w1." in str(p) for p in getattr(c, "source_patterns", ())):
            return W1_W3_W2
    return GATE_UP_DOWN


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by :class:`UnfusedExperts` with the same weights (on the
    meta device a skeleton stays on meta); returns how many were replaced."""
    names = None
    count = 0
    for name, module in list(model.named_modules()):
        if not _is_fused_experts(module):
            continue
        if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
            raise UserError(f"{name}: experts with biases or without a gate projection are not supported yet")
        gate_fn = type(module).__dict__.get("_apply_gate")
        if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
            raise UserError(f"{name}: {type(module).__name__} gates its experts in its own way; not supported yet")
        names = names or expert_names(model)
        gate_up, down = module.gate_up_proj, module.down_proj
        if getattr(module, "is_transposed", False):  # (E, H, 2I) and (E, I, H)
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        num, two_i, hidden = gate_up.shape
        inter = two_i // 2
        new = UnfusedExperts(num, hidden, inter, module.act_fn, names, gate_up.dtype, gate_up.device)
        if gate_up.device.type != "meta":
            concatenated = getattr(module, "is_concatenated", True)
            with torch.no_grad():
                for e in range(num):
                    expert = new.expert(e)
                    gu = gate_up[e]
                    g, u = (gu[:inter], gu[inter:]) if concatenated else (gu[0::2], gu[1::2])
                    getattr(expert, names[0]).weight.data = g.contiguous().clone()
                    getattr(expert, names[1]).weight.data = u.contiguous().clone()
                    getattr(expert, names[2]).weight.data = down[e].contiguous().clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        count += 1
    return count


def moe_keep(name: str, module: nn.Module) -> str | None:
    """Why nn.Linear ``name`` stays 16-bit because it routes tokens (None when it does not)."""
    if ROUTER_PATTERN.search(name) and module.out_features <= 1024 and ".experts." not in name:
        return "MoE router gate stays 16-bit"
    return None


def has_routed_experts(module: nn.Module) -> bool:
    """Whether ``module`` (a block, a model) holds a MoE layer's unfused experts."""
    return any(isinstance(m, UnfusedExperts) for m in module.modules())


def expert_stacks(block: nn.Module, layers: dict, stackable) -> dict[str, list[str]]:
    """Each MoE layer's same projection over all its experts, where every one of them is in ``layers``
    (name -> scheme) with one scheme that ``stackable`` accepts: ``{"<experts>.*.<proj>": [layer names in
    expert order]}``. Tuning quantizes such a group as one weight stacked along the rows ``(E*N, K)``: one
    launch per step instead of one per expert."""
    out = {}
    for path, m in block.named_modules():
        if not isinstance(m, UnfusedExperts):
            continue
        prefix = f"{path}." if path else ""
        for proj in m.names:
            names = [f"{prefix}{e}.{proj}" for e in range(m.num_experts)]
            schemes = {layers.get(n) for n in names}
            if len(schemes) == 1 and None not in schemes and stackable(schemes.pop()):
                out[f"{prefix}*.{proj}"] = names
    return out


def reset_routed(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, UnfusedExperts):
            m.routed = None


def unrouted_experts(block: nn.Module) -> tuple[int, int]:
    """(experts that no token reached since reset_routed, experts) over the block's MoE layers."""
    missed = total = 0
    for m in block.modules():
        if isinstance(m, UnfusedExperts):
            total += m.num_experts
            missed += m.num_experts if m.routed is None else int((m.routed == 0).sum())
    return missed, total


def drop_expert_converters(conversions: list) -> list:
    """transformers' weight conversions without those that fuse per-expert checkpoint tensors into 3-D
    parameters: an unfused skeleton loads per-expert tensors by their own names."""
    out = []
    for c in conversions:
        targets = getattr(c, "target_patterns", ())
        targets = [targets] if isinstance(targets, str) else list(targets)
        if type(c).__name__ == "WeightConverter" and any("experts" in str(t) for t in targets):
            continue
        out.append(c)
    return out


def checkpoint_namer(model: nn.Module):
    """``f(name) -> name`` as transformers' save_pretrained writes it: the model's renamings reversed (e.g.
    Mixtral's ``.mlp.`` back to ``.block_sparse_moe.``). Identity for models without renamings."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, rename_source_key
    except ImportError:
        return lambda name: name
    # As save_pretrained does for a model it did not load: the same names at export and at load time.
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    try:
        renamings = [r for r in (c.reverse_transform() for c in list(conversions)[::-1]) if isinstance(r, WeightRenaming)]
    except Exception:  # noqa: BLE001 - a transform that cannot be reversed: keep the model's names
        return lambda name: name
    if not renamings:
        return lambda name: name
    cache: dict[str, str] = {}

    def rename(name: str) -> str:
        if name not in cache:
            cache[name] = rename_source_key(name, renamings, [], reverse=True)[0]
        return cache[name]

    return rename


def router_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """MoE routers that are not nn.Linear (transformers 5's ``mlp.gate`` router modules): name ->
    (experts, hidden). The checkpoint lists them as 16-bit layers, as Intel AutoRound does, so that
    engines that build them as linear layers (vLLM's ``ReplicatedLinear`` gate) keep them unquantized."""
    out = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if isinstance(m, nn.Linear) or w is None or w.dim() != 2 or not ROUTER_PATTERN.search(name):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        if any(isinstance(c, UnfusedExperts) for c in parent.children()):  # a MoE layer's router
            out[name] = tuple(w.shape)
    return out
