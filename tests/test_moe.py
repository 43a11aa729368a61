"""MoE (transformers 5 fused experts): quantize per expert, save in Intel's per-expert layout, load back."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401
from quantize.calib import calibration_ids
from quantize.export.auto_round import save_auto_round
from quantize.integrations.transformers.modules import QuantLinear
from quantize.layer_config import plan_layers
from quantize.model import find_blocks, load_model
from quantize.moe import UnfusedExperts, reset_routed, unfuse_experts, unrouted_experts
from quantize.presets import TuneConfig
from quantize.quantizer import quantize_model
from quantize.scheme import Scheme

from conftest import CALIB, TOKENIZER

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=8192, max_position_embeddings=256)
MOE = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16)),
}
# The checkpoint's per-expert names: what save_pretrained writes for the 16-bit model (and vLLM loads).
EXPERT_KEY = {
    "qwen3_moe": "model.layers.1.mlp.experts.{e}.{p}",
    "mixtral": "model.layers.1.block_sparse_moe.experts.{e}.{p}",
    "deepseek_v3": "model.layers.1.mlp.experts.{e}.{p}",
    "qwen2_moe": "model.layers.1.mlp.experts.{e}.{p}",
}
PROJ = {"mixtral": ("w1", "w3", "w2")}


def portable(model):
    """Every QuantLinear on the portable kernel: an expert often gets a call of at most 4 rows, which
    tinygemm_cpu takes in bf16 models with its own rounding; the portable kernel multiplies by exactly the
    dequantized weights the in-memory model holds."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.force_kernel = "torch"
            m.prepare()
    return model


def build(family, path, seed=0, **over):
    cls_name, extra = MOE[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**{**COMMON, **extra, **over})).to(torch.bfloat16)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    return path


def test_unfused_forward_equals_fused(tmp_path):
    """Unfusing keeps the model's function: logits of the per-expert model equal transformers' own (eager)."""
    src = build("qwen3_moe", tmp_path / "src")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    assert unfuse_experts(model) == 2
    ids = torch.randint(0, 8192, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(MOE))
def test_moe_round_trip(family, tmp_path):
    src = build(family, tmp_path / "src")
    model, tok = load_model(str(src))
    experts = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    assert experts, "experts were not unfused"
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    gate, up, down = PROJ.get(family, ("gate_proj", "up_proj", "down_proj"))
    for e in range(8):
        for p in (gate, up, down):
            assert f"model.layers.1.mlp.experts.{e}.{p}" in plan.quantize
    assert not any(n.endswith(".gate") for n in plan.quantize)  # routers are not nn.Linear in transformers 5
    if family == "deepseek_v3":
        assert "model.layers.1.mlp.shared_experts.gate_proj" in plan.quantize
    if family == "qwen2_moe":  # the shared expert is quantized, its gate (an nn.Linear to 1 output) is not
        assert "model.layers.1.mlp.shared_expert.down_proj" in plan.quantize
        assert "router" in plan.keep["model.layers.1.mlp.shared_expert_gate"]
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    reset_routed(model)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=2, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    missed, total = unrouted_experts(model)
    assert total == 8 * len(experts) and 0 <= missed < total
    out = save_auto_round(model, tok, result, scheme, tmp_path / "q")

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for e in range(8):
        for p in (gate, up, down):
            assert EXPERT_KEY[family].format(e=e, p=p) + ".qweight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    router = "model.layers.1.block_sparse_moe.gate.weight" if family == "mixtral" else "model.layers.1.mlp.gate.weight"
    assert router in keys and not any(".gate.qweight" in k for k in keys)

    loaded = portable(AutoModelForCausalLM.from_pretrained(out))
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(result.weights)
    prompt = ids[:2, :16]
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, loaded(prompt).logits)


def test_unrouted_expert_gets_rtn(tmp_path):
    """An expert the router never picks is quantized all the same, with round-to-nearest weights."""
    from quantize.numerics import quantize_weight

    src = build("deepseek_v3", tmp_path / "src")
    model, tok = load_model(str(src))
    with torch.no_grad():  # DeepSeek-V3 selects experts by score + correction bias: expert 7 is never chosen
        model.model.layers[1].mlp.gate.e_score_correction_bias[7] = -1e4
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    reset_routed(model)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in plan.quantize if ".experts.7." in n}
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=3, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    routed = [m.routed for m in model.modules() if isinstance(m, UnfusedExperts)]
    assert routed and all(int(r[7]) == 0 for r in routed) and all(int(r[:7].sum()) > 0 for r in routed)
    assert unrouted_experts(model)[0] >= 1
    for n, w in weights.items():
        q, s, z = quantize_weight(w.float(), 4, 32, True)
        assert torch.equal(result.weights[n].q, q), n


INTEL_QUANTIZE = r'''
import sys
from pathlib import Path
from auto_round import AutoRound
from transformers import AutoTokenizer
src, out, calib = sys.argv[1:4]
texts = [t for t in Path(calib).read_text().split("\n\n") if len(t) > 200][:16]
ar = AutoRound(src, tokenizer=AutoTokenizer.from_pretrained(src), bits=4, group_size=32, sym=True, iters=0,
               disable_opt_rtn=True, disable_model_free=True, amp=False, dataset=texts, nsamples=4, seqlen=32,
               batch_size=2, device_map="cpu", seed=0)
ar.quantize_and_save(out, format="auto_round")
assert "quantize" not in sys.modules
'''

INTEL_LOAD = r'''
import sys, torch
from transformers import AutoModelForCausalLM
ref = torch.load(sys.argv[1] + "/ref.pt")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cpu")
assert any(type(m).__name__ == "QuantLinear" for m in model.modules())
with torch.no_grad():
    logits = model(ref["ids"]).logits
print("MAXDIFF", (logits.float() - ref["logits"].float()).abs().max().item())
assert "quantize" not in sys.modules
'''


def _intel(script, *args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "QUANTIZE_LLM_NO_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=args[0].parent)  # away from the repository: nothing named quantize on the path
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout


def test_qwen3_moe_intel_compat_both_ways(tmp_path):
    """Intel AutoRound 0.16.1 (RTN) and we write the same tensors under the same per-expert names; each
    loader loads the other's checkpoint with the same logits. (Intel 0.16.1 fails on tiny Mixtral itself:
    its unfused skeleton leaves the w1/w2/w3 experts on the meta device.)"""
    pytest.importorskip("auto_round")
    from safetensors.torch import load_file

    src = build("qwen3_moe", tmp_path / "src")
    _intel(INTEL_QUANTIZE, src, tmp_path / "intel", CALIB)
    intel = next((tmp_path / "intel").rglob("config.json")).parent  # Intel adds a subfolder
    model, tok = load_model(str(src))
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=0, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    ours = save_auto_round(model, tok, result, scheme, tmp_path / "ours")
    prompt = ids[:2, :16]
    with torch.no_grad():
        logits = model(prompt).logits
    torch.save({"ids": prompt, "logits": logits}, ours / "ref.pt")

    theirs = load_file(intel / "model.safetensors")
    mine = load_file(ours / "model.safetensors")
    assert set(theirs) == set(mine)
    experts = [k for k in mine if ".experts." in k]
    assert experts and all(torch.equal(theirs[k], mine[k]) for k in experts)
    intel_cfg = json.loads((intel / "config.json").read_text())["quantization_config"]
    our_cfg = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert set(intel_cfg["extra_config"]) == set(our_cfg["extra_config"])  # the routers, 16-bit

    loaded = portable(AutoModelForCausalLM.from_pretrained(intel))  # Intel's checkpoint, our loader
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, logits)
    out = _intel(INTEL_LOAD, ours)  # ours, Intel's loader
    assert float(out.split("MAXDIFF")[1].split()[0]) == 0.0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_convert_reads_moe_checkpoint(family, tmp_path):
    """quantize.convert reads an MoE auto_round checkpoint per expert: written again, the same tensors."""
    from safetensors.torch import load_file

    from quantize.convert import convert

    src = build(family, tmp_path / "src")
    model, tok = load_model(str(src))
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    ids = calibration_ids(str(CALIB), tok, nsamples=2, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=0, nsamples=2, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    out = save_auto_round(model, tok, result, scheme, tmp_path / "q")
    again = convert(out, "auto_round", tmp_path / "again")[0]
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text())["quantization_config"]["extra_config"] == \
        json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]


def test_deepseek_v3_loads_in_intels_loader(tmp_path):
    """Intel's loader (auto-round 0.16.1, CPU) loads our DeepSeek-V3 checkpoint (MLA, shared experts,
    routed experts per expert). Its MoE/MLA modules compute in another order: logits agree to bf16
    rounding (measured 3.9e-3 on logits of magnitude 0.7), not bit for bit as with Qwen3-MoE. MLA sizes as
    in real models: a 24-output kv_a_proj_with_mqa (the 16/8 sizes above) is one Intel's loader cannot take."""
    pytest.importorskip("auto_round")
    src = build("deepseek_v3", tmp_path / "src", kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32)
    model, tok = load_model(str(src))
    blocks = find_blocks(model)
    scheme = Scheme(4, 32, True)
    plan = plan_layers(model, blocks.prefix, scheme)
    ids = calibration_ids(str(CALIB), tok, nsamples=4, seqlen=32, seed=0)
    result = quantize_model(model, blocks, plan, ids, TuneConfig(iters=0, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"), progress=False)
    ours = save_auto_round(model, tok, result, scheme, tmp_path / "ours")
    with torch.no_grad():
        torch.save({"ids": ids[:2, :16], "logits": model(ids[:2, :16]).logits}, ours / "ref.pt")
    out = _intel(INTEL_LOAD, ours)
    assert float(out.split("MAXDIFF")[1].split()[0]) < 1e-2


def test_layer_compiled_tuning_step_equals_eager(tmp_path):
    """A MoE block tunes with each layer's quantize-dequantize compiled and the block eager: the loss and
    gradients of eager mode, one graph per weight shape serving every expert."""
    from quantize.model import block_output, capture_block_inputs
    from quantize.signround import tuning_loss

    model, _ = load_model(str(build("qwen3_moe", tmp_path / "src")))
    blocks = find_blocks(model)
    ids = torch.randint(0, 8000, (4, 32), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), torch.float32)
    block = blocks.modules[0].float().requires_grad_(False)
    weights = {n: m.weight for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}
    schemes = {n: (Scheme(4, 32, True), {}) for n in weights}
    y = block_output(block(x, **kwargs))
    y = y + 0.01 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (tuning_loss(False), tuning_loss("layers")):
        torch.manual_seed(2)
        p = {n: tuple(t.requires_grad_() for t in (0.3 * torch.rand(w.shape) - 0.15, 0.9 + 0.1 * torch.rand(w.shape[0], w.shape[1] // 32),
                                                   0.9 + 0.1 * torch.rand(w.shape[0], w.shape[1] // 32))) for n, w in weights.items()}
        loss = fn(block, weights, p, schemes, {}, x, y, kwargs, False)
        loss.backward()
        results.append((loss.detach(), [t.grad for ts in p.values() for t in ts]))
    (eager_loss, eager_grads), (comp_loss, comp_grads) = results
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=0)
    assert sum(g is not None for g in comp_grads) == sum(g is not None for g in eager_grads) > 0
    for g_c, g_e in zip(comp_grads, eager_grads):
        if g_e is not None:
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-7)


def _experts(num=8, hidden=64, inter=32, seed=0):
    torch.manual_seed(seed)
    experts = UnfusedExperts(num, hidden, inter, torch.nn.SiLU())
    for p in experts.parameters():
        p.data = torch.randn_like(p, dtype=torch.float32) * 0.1
    return experts


def _routing(tokens, num, top_k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num, generator=gen)[:top_k] for _ in range(tokens)])
    index[:5] = num - 1  # one expert gets many pairs, and (8 experts, 40 tokens x 2) some may get none
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1)
    return index, weights


@pytest.mark.parametrize("device,amp", [("cpu", False), ("cpu", True), ("cuda", True)])
def test_grouped_experts_forward_equals_the_loop_over_experts(device, amp):
    """Plain nn.Linear experts run as three grouped matrix products; hooked experts (activation
    quantization, input statistics) keep the loop: both give the same outputs and gradients."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    experts = _experts().to(device)
    x = torch.randn(40, 64, device=device, requires_grad=True)
    index, weights = (t.to(device) for t in _routing(40, 8, 2))
    results = []
    for grouped in (True, False):
        hook = None if grouped else experts.expert(0).gate_proj.register_forward_pre_hook(lambda m, a: None)
        x.grad = None
        for p in experts.parameters():
            p.grad = None
            p.requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            # (on CUDA only under bf16 autocast, as tuning runs: its grouped GEMM takes bf16 alone)
            assert (experts._grouped_dtype(x) is not None) == grouped
            out = experts(x, index, weights)
        out.float().square().sum().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in experts.parameters()]))
        if hook:
            hook.remove()
    (out_g, dx_g, dw_g), (out_l, dx_l, dw_l) = results
    tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_g, out_l, **tol)
    torch.testing.assert_close(dx_g, dx_l, **tol)
    for a, b in zip(dw_g, dw_l):
        torch.testing.assert_close(a, b, **tol)
    assert experts.routed.sum() == 2 * 40 * 2  # both passes counted their pairs
    assert torch.equal(experts(x[:0], index[:0], weights[:0]), x[:0].detach())  # an empty batch: nothing routed


def test_stacked_experts_tune_as_each_expert_alone():
    """A MoE layer's experts' projections tune as one stacked weight: the same loss and, split back by
    rows, the same gradients as every expert's own weight; the stacks cover exactly the experts."""
    from quantize import weight_rules
    from quantize.moe import expert_stacks
    from quantize.signround import _stack_experts, tuning_loss

    experts = _experts()
    block = torch.nn.ModuleDict({"experts": experts}).requires_grad_(False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = block

        def forward(self, x, index, weights):
            return self.mlp["experts"](x, index, weights)

    blk = Block()
    x = torch.randn(40, 64)
    index, route = _routing(40, 8, 2)
    y = blk(x, index, route).detach() + 0.01 * torch.randn(40, 64)
    layers = {n: Scheme(4, 32, False) for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)}
    layers["mlp.experts.3.down_proj"] = Scheme(2, 32, False)  # one expert differs: its projection is not stacked
    stacks = expert_stacks(blk, layers, weight_rules.row_local)
    assert sorted(stacks) == ["mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"]
    assert stacks["mlp.experts.*.up_proj"] == [f"mlp.experts.{e}.up_proj" for e in range(8)]
    assert expert_stacks(blk, layers, lambda s: False) == {}  # a rule with per-tensor state never stacks

    modules = dict(blk.named_modules())
    weights = {n: modules[n].weight.detach() for n in layers}
    ref_w = {n: w.clone() for n, w in weights.items()}
    schemes = {n: (s, {}) for n, s in layers.items()}
    tuned = _stack_experts(stacks, weights, schemes, {}, modules)
    assert modules["mlp.experts.5.gate_proj"].weight.data_ptr() == tuned["mlp.experts.*.gate_proj"][5 * 32].data_ptr()

    def params(shapes):
        torch.manual_seed(2)
        return {n: tuple(t.requires_grad_() for t in (0.3 * torch.rand(w.shape) - 0.15, 0.9 + 0.1 * torch.rand(w.shape[0], w.shape[1] // 32),
                                                       0.9 + 0.1 * torch.rand(w.shape[0], w.shape[1] // 32))) for n, w in shapes.items()}

    alone = params(ref_w)
    # the stacked parameters: each expert's own, concatenated along the rows
    together = {n: p for n, p in alone.items() if not any(n in m for m in stacks.values())}
    for key, names in stacks.items():
        together[key] = tuple(torch.cat([alone[n][i].detach() for n in names]).requires_grad_() for i in range(3))
    fn = tuning_loss(False)
    kwargs = {"index": index, "weights": route}
    loss_alone = fn(blk, ref_w, alone, schemes, {}, x, y, kwargs, False)
    loss_together = fn(blk, tuned, together, schemes, stacks, x, y, kwargs, False)
    torch.testing.assert_close(loss_together, loss_alone, rtol=1e-6, atol=0)
    loss_alone.backward()
    loss_together.backward()
    for key, names in stacks.items():
        for i in range(3):
            torch.testing.assert_close(together[key][i].grad, torch.cat([alone[n][i].grad for n in names]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True), Scheme(3, 32, False), Scheme(4, 32, True, data_type="mx_fp")],
                         ids=["W4-sym", "W3-asym-searched", "MXFP4"])
def test_tuning_with_stacked_experts_equals_tuning_each_expert(tmp_path, monkeypatch, scheme):
    """Where experts tune stacked (CUDA; forced here on the CPU), tuning gives the codes, scales and losses
    of tuning every expert's weight on its own, and the block holds each layer's own dequantized weight."""
    import copy

    from quantize import signround
    from quantize.model import block_output, capture_block_inputs
    from quantize.signround import tune_block

    model, _ = load_model(str(build("qwen3_moe", tmp_path / "src")))
    blocks = find_blocks(model)
    ids = torch.randint(0, 8000, (8, 32), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), torch.float32)
    block = blocks.modules[0].float().requires_grad_(False)
    targets = block_output(block(x, **kwargs)).detach()
    if scheme.data_type == "mx_fp":
        from quantize.scheme import get_scheme
        scheme = get_scheme("MXFP4A16")
    layers = {n: scheme for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}
    cfg = TuneConfig(iters=20, nsamples=8, batch_size=4)
    results, seen = {}, []
    targets = targets + 0.02 * targets.std() * torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    stack = signround._stack_experts
    monkeypatch.setattr(signround, "_stack_experts", lambda stacks, *a: seen.append(sorted(stacks)) or stack(stacks, *a))
    for on in (set(), {"cpu"}):
        monkeypatch.setattr(signround, "STACKS_EXPERTS_ON", on)
        b = copy.deepcopy(block)
        results[bool(on)] = (b, tune_block(b, layers, x, targets, kwargs, cfg, torch.Generator().manual_seed(0)))
    (b_alone, alone), (b_stacked, stacked) = results[False], results[True]
    assert (stacked.loss_before, stacked.loss_after) == (alone.loss_before, alone.loss_after)
    assert stacked.loss_after < stacked.loss_before
    assert seen == [[], ["mlp.experts.*.down_proj", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"]]
    assert sorted(stacked.weights) == sorted(alone.weights) == sorted(layers)
    for name, qw in alone.weights.items():
        other = stacked.weights[name]
        for a, b in ((qw.q, other.q), (qw.scales, other.scales), (qw.zeros, other.zeros)):
            assert torch.equal(a, b), name
        assert other.q.untyped_storage().nbytes() == other.q.numel() * other.q.element_size()  # its own copy
        w = b_stacked.get_submodule(name).weight
        assert torch.equal(w, b_alone.get_submodule(name).weight)
        assert torch.equal(w, other.dequantize(torch.float32))
