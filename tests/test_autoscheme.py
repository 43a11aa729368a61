"""AutoScheme: bit accounting, the exact allocation, its constraints, the block-wise scores, the command line."""

import importlib.util
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import CALIB, build_tiny_llama
from quantize.autoscheme import (
    Scope, Unit, allocate, average_bits, build_units, choose_schemes, find_scope, layer_bits, option_name, parse_options,
    plan_from_scores, score_options,
)
from quantize.calib import calibration_ids
from quantize.checkpoint import layout_for
from quantize.export.fused import fused_groups
from quantize.model import UserError, find_blocks, load_model
from quantize.numerics import fake_quantize
from quantize.scheme import Scheme, get_scheme

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- accounting

def test_layer_bits_hand_count():
    w4 = get_scheme("W4A16")  # g128, sym: no zero point counted
    # 256 x 512: 131072 weights x 4 bits + 256 rows x 4 groups x 16-bit scales
    assert layer_bits(256, 512, w4) == 131072 * 4 + 256 * 4 * 16 == 540672
    assert layer_bits(256, 512, w4) / 131072 == 4.125
    asym = get_scheme("W2A16G64", sym=False)  # 64 x 128: 8192 x 2 + 64 x 2 groups x (16 + 2)
    assert layer_bits(64, 128, asym) == 8192 * 2 + 128 * 18 == 18688
    per_channel = Scheme(8, -1)  # one group per row: 10 x 128 x 8 + 10 x 16
    assert layer_bits(10, 128, per_channel) == 10240 + 160
    assert layer_bits(256, 512, None) == 16 * 131072
    assert layer_bits(256, 512, w4, ignore_scale_zp_bits=True) == 4 * 131072
    assert layer_bits(64, 128, asym, ignore_scale_zp_bits=True) == 2 * 8192
    # the average weighs layers by their size: (540672 + 16 x 131072 + 16384 x 2.125) / (131072 x 2 + 16384)
    shapes = {"a": (256, 512), "b": (256, 512), "c": (128, 128)}
    avg = average_bits(shapes, {"a": w4, "b": None, "c": get_scheme("W2A16")})
    assert avg == (540672 + 16 * 131072 + 16384 * 2 + 128 * 16) / (2 * 131072 + 16384)


def test_parse_options():
    assert [option_name(o) for o in parse_options("w4a16, W2A16,bf16,W2A16")] == ["W2A16", "W4A16", "BF16"]
    assert parse_options("W2A16,W4A16", group_size=64, sym=False)[0] == Scheme(2, 64, False)
    with pytest.raises(UserError, match="unknown option 'W5A16'"):
        parse_options("W2A16,W5A16")


# ---------------------------------------------------------------------------------------------- allocation

def _random_units(rng: random.Random, n_units: int) -> list[Unit]:
    units = []
    for i in range(n_units):
        k = rng.randint(1, 3)
        bits = sorted(rng.sample(range(10, 200), k))
        scores = sorted((rng.random() for _ in range(k)), reverse=True)
        if rng.random() < 0.3:  # not always monotone: more bits may score worse
            rng.shuffle(scores)
        units.append(Unit(f"u{i}", [f"u{i}"], [None] * k, bits, scores))
    return units


def test_dp_matches_brute_force():
    rng = random.Random(0)
    for trial in range(200):
        units = _random_units(rng, rng.randint(1, 6))
        low, high = sum(min(u.bits) for u in units), sum(max(u.bits) for u in units)
        budget = rng.randint(low, high)
        best = min(
            sum(u.scores[k] for u, k in zip(units, picks))
            for picks in itertools.product(*(range(len(u.bits)) for u in units))
            if sum(u.bits[k] for u, k in zip(units, picks)) <= budget
        )
        picks, score = allocate(units, budget)
        assert sum(u.bits[k] for u, k in zip(units, picks)) <= budget, trial
        assert score == pytest.approx(best, abs=1e-12), trial
        assert sum(u.scores[k] for u, k in zip(units, picks)) == pytest.approx(score, abs=1e-12)


def _random_scope(rng: random.Random, options) -> tuple[Scope, dict]:
    """Blocks of q/k/v/o and gate/up/down with random sizes (multiples of 128), some pinned."""
    scope = Scope(shapes={})
    scores = {}
    hidden = 128 * rng.randint(1, 4)
    inter = 128 * rng.randint(1, 6)
    for b in range(rng.randint(1, 4)):
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // 2, hidden),
                  "self_attn.v_proj": (hidden // 2, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        for short, shape in shapes.items():
            name = f"model.layers.{b}.{short}"
            scope.shapes[name] = shape
            if short == "mlp.down_proj" and rng.random() < 0.2:
                scope.fixed[name], scope.why_fixed[name] = rng.choice(options), "pinned by layer_config"
                continue
            scope.available[name] = list(options)
            scores[name] = {option_name(o): rng.random() * (9 - i * 3) for i, o in enumerate(options)}
    return scope, scores


def test_average_never_exceeds_target_and_fused_layers_agree():
    """Property over many random instances: the plan's average, recounted, is <= the target; q/k/v and gate/up
    share a scheme; pinned layers keep theirs."""
    rng = random.Random(1)
    option_sets = [parse_options("W2A16,W4A16"), parse_options("W2A16G32,W3A16,W8A16"), parse_options("W4A16G64,BF16"),
                   parse_options("W2A16,W4A16", sym=False)]
    for trial in range(300):
        options = rng.choice(option_sets)
        scope, scores = _random_scope(rng, options)
        ignore = rng.random() < 0.5
        everything_low = average_bits(scope.shapes, {**{n: options[0] for n in scope.available}, **scope.fixed}, ignore)
        everything_high = average_bits(scope.shapes, {**{n: options[-1] for n in scope.available}, **scope.fixed}, ignore)
        target = round(rng.uniform(everything_low, everything_high), rng.choice([1, 2, 3]))
        if not everything_low <= target <= everything_high:
            continue
        choices, average, reachable, _, _ = plan_from_scores(scope, options, scores, target, ignore)
        assert average <= target, (trial, average, target)
        assert average == average_bits(scope.shapes, choices, ignore)
        assert reachable == pytest.approx((everything_low, everything_high))
        for group in fused_groups(scope.shapes).values():
            assert len({choices[n] for n in group}) == 1, (trial, group)
        for name, scheme in scope.fixed.items():
            assert choices[name] == scheme


def test_intel_2186_target_is_a_ceiling():
    """AutoRound #2186: a 2.8 target gave 2.94. Targets just above a reachable total must not round up."""
    options = parse_options("W2A16,W4A16")
    scope, scores = _random_scope(random.Random(7), options)
    scope.fixed.clear()
    scope.available = {n: options for n in scope.shapes}
    scores = {n: {"W2A16": 1.0 + i % 5, "W4A16": 0.1} for i, n in enumerate(scope.shapes)}
    for target in (2.2, 2.5, 2.8, 3.0, 3.3, 3.7, 4.0):
        choices, average, _, _, _ = plan_from_scores(scope, options, scores, target)
        assert average <= target


def test_no_layer_gets_fewer_bits_than_the_best_uniform_option():
    """At 4.5 bits with W2/W4/W8 the whole model fits in W4A16 (4.125): scores that would trade layers down to
    W2 to fund W8 elsewhere cannot; at 3.0 (only W2 fits uniformly) W2 stays available."""
    options = parse_options("W2A16,W4A16,W8A16")
    scope, _ = _random_scope(random.Random(5), options)
    scope.fixed.clear()
    scope.available = {n: options for n in scope.shapes}
    # W2 nearly free for half the layers, W8 a large gain for the others: the unconstrained optimum mixes W2 and W8.
    scores = {n: ({"W2A16": 0.01, "W4A16": 0.005, "W8A16": 0.0} if i % 2 else {"W2A16": 50.0, "W4A16": 10.0, "W8A16": 0.0})
              for i, n in enumerate(scope.shapes)}
    units = build_units(scope, scores)
    params = sum(o * i for o, i in scope.shapes.values())
    unconstrained, _ = allocate(units, math.floor(4.5 * params))
    assert any(u.options[k].bits == 2 for u, k in zip(units, unconstrained))
    choices, average, _, _, floor = plan_from_scores(scope, options, scores, 4.5)
    assert option_name(floor) == "W4A16" and average <= 4.5
    assert min(s.bits for s in choices.values()) == 4 and max(s.bits for s in choices.values()) == 8
    choices, average, _, _, floor = plan_from_scores(scope, options, scores, 3.0)
    assert option_name(floor) == "W2A16" and any(s.bits == 2 for s in choices.values())


def test_infeasible_target_names_the_range():
    scope, scores = _random_scope(random.Random(3), parse_options("W2A16,W4A16"))
    scope.fixed.clear()
    scope.available = {n: parse_options("W2A16,W4A16") for n in scope.shapes}
    for target in (2.0, 4.5):
        with pytest.raises(UserError, match=r"reach 2\.1250 to 4\.1250 bits per weight"):
            plan_from_scores(scope, parse_options("W2A16,W4A16"), scores, target)


# ---------------------------------------------------------------------------------------------- on a model

@pytest.fixture(scope="module")
def model_and_ids(tiny_llama):
    model, tok = load_model(str(tiny_llama))
    return model, find_blocks(model), calibration_ids(str(CALIB), tok, 6, 48, seed=0)


def _whole_model_scores(model, blocks, scope, option, ids, batch):
    """The straightforward reference: one autograd pass through the whole model (float32 copy)."""
    import copy

    ref = copy.deepcopy(model).float()
    names = [n for n in scope.available if option in scope.available[n]]
    orig = {n: ref.get_submodule(n).weight.detach() for n in names}
    q = {n: fake_quantize(w, option.bits, option.group_size, option.sym).detach().requires_grad_(True) for n, w in orig.items()}
    scores = dict.fromkeys(names, 0.0)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    for b in range(0, ids.shape[0], batch):
        x = ids[b:b + batch]
        logits = functional_call(ref, {f"{n}.weight": t for n, t in q.items()}, (x,), {"use_cache": False}).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum") / tokens
        loss.backward()
        for n in names:
            scores[n] += abs((q[n].grad.float() * (orig[n] - q[n].detach()).float()).sum().item())
            q[n].grad = None
    return scores


def test_blockwise_scores_equal_whole_model_backward(model_and_ids):
    model, blocks, ids = model_and_ids
    options = parse_options("W2A16G32,W4A16G32")
    scope = find_scope(model, blocks, options, layout_for=layout_for)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_options(model, blocks, scope, options, ids, batch_size=2, progress=False)
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in model.state_dict().items())
    for option in options:
        ref = _whole_model_scores(model, blocks, scope, option, ids, batch=2)
        for name, value in ref.items():
            assert scores.per_layer[name][option.name] == pytest.approx(value, rel=2e-3, abs=1e-7), (name, option.name)
    again = score_options(model, blocks, scope, options, ids, batch_size=2, progress=False)
    assert again.per_layer == scores.per_layer  # deterministic


def test_plan_on_model_fused_and_pinned(model_and_ids):
    model, blocks, ids = model_and_ids
    pins = {"layers.0.mlp.down_proj": {"bits": 8}, "layers.1.self_attn.k_proj": {"bits": 16}}
    plan = choose_schemes(model, blocks, "W2A16G32,W4A16G32", 5.2, ids, layer_config=pins, layout_for=layout_for, progress=False)
    assert plan.average <= 5.2
    assert plan.average == average_bits(plan.shapes, plan.choices)
    assert plan.choices["model.layers.0.mlp.down_proj"] == Scheme(8, 128)  # fields it leaves out come from the base, W4A16
    for attn in ("q_proj", "v_proj"):  # k_proj pinned 16-bit: its fused siblings follow it
        assert plan.choices[f"model.layers.1.self_attn.{attn}"] is None
    for group in fused_groups(plan.choices).values():
        assert len({plan.choices[n] for n in group}) == 1, group
    # the layer_config it hands the planner names every layer exactly, then keeps the user's entries
    assert plan.layer_config["model.layers.1.self_attn.q_proj"] == {"bits": 16}
    assert "layers.0.mlp.down_proj" in plan.layer_config
    assert "W2A16G32" in plan.summary() and "<= target 5.2" in plan.summary()


# ---------------------------------------------------------------------------------------------- command line

def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_cli_end_to_end(tmp_path):
    src = build_tiny_llama(tmp_path / "llama", hidden=128, intermediate=256, layers=2)
    out = tmp_path / "mixed"
    r = run(src, "--schemes", "W2A16,W4A16", "--bits", "3", "--iters", "0", "--dataset", CALIB, "--output_dir", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "AutoScheme: target 3 bits, achieved" in r.stdout
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    base = {"bits": qcfg["bits"], "group_size": qcfg["group_size"], "sym": qcfg["sym"]}
    from transformers import AutoModelForCausalLM

    import quantize  # noqa: F401  (loads auto_round checkpoints)

    fp = AutoModelForCausalLM.from_pretrained(src)
    shapes = {n: (m.out_features, m.in_features) for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    schemes = {}
    for name in shapes:
        spec = {**base, **qcfg["extra_config"].get(name, {})}
        schemes[name] = None if spec["bits"] >= 16 else Scheme(spec["bits"], spec["group_size"], spec["sym"])
    assert average_bits(shapes, schemes) <= 3
    assert len({s.bits for s in schemes.values()}) == 2  # really mixed
    for group in fused_groups(shapes).values():
        assert len({schemes[n] for n in group}) == 1, group
    saved = json.loads((out / "autoscheme_layer_config.json").read_text())
    if importlib.util.find_spec("matplotlib"):  # the test extra installs it
        assert (out / "autoscheme.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "picture" in r.stdout
    else:
        assert not (out / "autoscheme.png").exists() and "pip install matplotlib" in r.stdout
    assert {n: saved[n]["bits"] for n in shapes} == {n: s.bits for n, s in schemes.items()}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("args, message", [
    (["--schemes", "W2A16,W4A16", "--bits", "1.5"], "reach 2.1250 to 4.1250"),
    (["--schemes", "W2A16,W4A16", "--bits", "6"], "above the richest plan"),
    (["--schemes", "W2A16,W5A16", "--bits", "3"], "unknown option 'W5A16'"),
    (["--schemes", "W2A16,W4A16"], "needs a target"),
    (["--bits", "2.5"], "needs --schemes"),
])
def test_cli_bad_input(tmp_path, args, message):
    src = build_tiny_llama(tmp_path / "llama", hidden=128, intermediate=256, layers=1)
    out = tmp_path / "out"
    r = run(src, *args, "--iters", "0", "--dataset", CALIB, "--output_dir", out, "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_option_a_layer_cannot_take_is_named(model_and_ids):
    model, blocks, ids = model_and_ids  # hidden 64: group 128 fits only down_proj (in_features 128)
    plan = choose_schemes(model, blocks, "W2A16G32,W4A16", 2.6, ids, layout_for=layout_for, progress=False)
    why = plan.unavailable["model.layers.0.self_attn.q_proj"]["W4A16"]
    assert why == "in_features 64 is not a multiple of group_size 128"
    assert "model.layers.0.mlp.down_proj" not in plan.unavailable
    assert all(s == Scheme(2, 32) for n, s in plan.choices.items() if "down_proj" not in n)
    assert "unavailable for model.layers.0.self_attn.q_proj: W4A16 (in_features 64" in plan.summary()
    assert plan.average <= 2.6
