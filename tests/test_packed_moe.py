"""The engines' per-expert MoE compute (quantize.integrations.packed_moe): equal to the dequantized experts,
opaque to torch.compile (one custom op: vLLM compiles the model, on the CPU too), and inside a CUDA graph
the masked every-expert form equal to the eager routed loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantize.integrations.packed_moe import experts_forward, expert_parameters, prepare_experts
from quantize.numerics import dequantize, quantize_weight
from quantize.packing import pack
from quantize.scheme import Scheme

EXPERTS, HIDDEN, INTER, TOP_K = 8, 128, 64, 2


def packed_experts(scheme: Scheme, device: str, seed: int = 0):
    """A module holding EXPERTS packed experts (gate+up as w13, down as w2) and their dequantized weights."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    params = expert_parameters(scheme, "gptq", "test", EXPERTS, HIDDEN, INTER, tp_size=1)
    dense = {"w13": [], "w2": []}
    for stem, (n, k) in {"w13": (2 * INTER, HIDDEN), "w2": (HIDDEN, INTER)}.items():
        for e in range(EXPERTS):
            w = torch.randn(n, k, generator=g) * 0.05
            q, s, z = quantize_weight(w, scheme.bits, scheme.group_size, scheme.sym)
            p = pack("gptq", q, s, z, scheme.bits)
            for t in ("qweight", "qzeros", "scales"):
                params[f"{stem}_{t}"].data[e] = getattr(p, t)
            dense[stem].append(dequantize(q, s.half().float(), z))
    for name, p in params.items():
        layer.register_parameter(name, torch.nn.Parameter(p.data.to(device), requires_grad=False))
    prepare_experts(layer, scheme, "gptq", HIDDEN, INTER, torch.float32)
    return layer, {k: torch.stack(v).to(device) for k, v in dense.items()}


def reference(dense, x, weights, ids):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = ids[t, slot]
            h = dense["w13"][e] @ x[t]
            out[t] += weights[t, slot] * (dense["w2"][e] @ (F.silu(h[:INTER]) * h[INTER:]))
    return out


def routing(tokens: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g)
    logits = torch.randn(tokens, EXPERTS, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(TOP_K, -1)
    return x.to(device), weights.to(device), ids.to(torch.int32).to(device)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True), Scheme(3, 32, False)], ids=["W4-sym", "W3-asym"])
def test_experts_forward_equals_the_dequantized_experts(scheme):
    layer, dense = packed_experts(scheme, "cpu")
    x, weights, ids = routing(6, "cpu")
    got = experts_forward(layer, x, weights, ids)
    torch.testing.assert_close(got, reference(dense, x, weights, ids), rtol=1e-4, atol=1e-4)


def test_experts_forward_compiles_whole_graph():
    """fullgraph=True fails on any graph break: the routed loop (data-dependent expert ids) must be hidden
    in the custom op, as vLLM's compiled CPU engine needs."""
    layer, _ = packed_experts(Scheme(4, 32, True), "cpu")
    x, weights, ids = routing(5, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, weights, ids):
        return experts_forward(layer, x * 2, weights, ids) + 1

    torch.testing.assert_close(step(x, weights, ids), experts_forward(layer, x * 2, weights, ids) + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_experts_forward_in_a_cuda_graph_equals_eager():
    layer, dense = packed_experts(Scheme(3, 32, False), "cuda")  # not Marlin's: the per-expert kernels serve it
    x, weights, ids = routing(4, "cuda")
    eager = experts_forward(layer, x, weights, ids)
    static = [t.clone() for t in (x, weights, ids)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        experts_forward(layer, *static)  # warm-up outside the capture (kernels compiled, workspaces allocated)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_forward(layer, *static)
    x2, w2, ids2 = routing(4, "cuda", seed=2)
    for buf, new in zip(static, (x2, w2, ids2)):
        buf.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, experts_forward(layer, x2, w2, ids2), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(eager, reference(dense, x, weights, ids), rtol=2e-3, atol=2e-3)
