import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from quantize.eval import TASKS, evaluate_tasks, format_table, load_eval_ids, perplexity
from quantize.eval.zeroshot import loglikelihood

from conftest import TOKENIZER, shared_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


# --- perplexity ---------------------------------------------------------------------------------


def test_load_eval_ids_follows_split_convention(tmp_path, tokenizer):
    text = "First paragraph, with words.\nSecond line.\n\nAnother one.\n\n\n  After three newlines.\n"
    path = tmp_path / "eval.txt"
    path.write_text(text, encoding="utf-8")
    expected = []
    for piece in text.split("\n\n"):
        expected += tokenizer.encode(piece + "\n\n", add_special_tokens=False)
    ids = load_eval_ids(path, tokenizer)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == expected
    assert load_eval_ids(str(path), tokenizer, max_chars=20).tolist() == tokenizer.encode(
        text[:20] + "\n\n", add_special_tokens=False
    )


def test_load_eval_ids_errors_name_the_file(tmp_path, tokenizer):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_eval_ids(missing, tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        load_eval_ids(empty, tokenizer)


def _random_ids(model, n: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))


def _hand_perplexity(model, windows: list[torch.Tensor]) -> float:
    losses = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].float()
            losses.append(F.cross_entropy(logits, window[1:]).item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_hand_computation(model):
    seqlen = 32
    ids = _random_ids(model, 2 * seqlen + 7)
    expected = _hand_perplexity(model, [ids[:seqlen], ids[seqlen : 2 * seqlen]])
    for batch_size in (1, 8):
        got = perplexity(model, ids, seqlen=seqlen, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_max_windows(model):
    seqlen = 32
    ids = _random_ids(model, 3 * seqlen)
    one = perplexity(model, ids, seqlen=seqlen, max_windows=1, progress=False)
    assert one == pytest.approx(_hand_perplexity(model, [ids[:seqlen]]), rel=1e-5)
    assert one == pytest.approx(perplexity(model, ids[:seqlen], seqlen=seqlen, progress=False), rel=1e-6)
    assert one != pytest.approx(perplexity(model, ids, seqlen=seqlen, progress=False), rel=1e-6)


def test_perplexity_needs_a_full_window(model):
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, torch.arange(31), seqlen=32, progress=False)


# --- zero-shot ----------------------------------------------------------------------------------


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward per request, with lm-eval's context/continuation split."""
    context_ids = tokenizer.encode(context.rstrip(), add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    target = torch.tensor(whole[len(context_ids) :])
    with torch.no_grad():
        logits = model(torch.tensor(whole[:-1])[None]).logits[0, -len(target) :].float()
    logprobs = F.log_softmax(logits, dim=-1)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def _direct_choice_metrics(model, tokenizer, items) -> dict[str, float]:
    acc = acc_norm = 0
    for item in items:
        lls = [_direct_loglikelihood(model, tokenizer, item.context, " " + c)[0] for c in item.choices]
        normed = [ll / len(c) for ll, c in zip(lls, item.choices)]
        acc += lls.index(max(lls)) == item.gold
        acc_norm += normed.index(max(normed)) == item.gold
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


LONG = "a rambling answer that goes on and on about several unrelated things for a good while longer"


@pytest.fixture
def task_dir(tmp_path) -> Path:
    # Same formats as the shipped files (see the first lines of ../shared/data/tasks/*).
    _write_jsonl(
        tmp_path / "lambada_openai_test.jsonl",
        [
            {"text": "He opened the door and walked into the room"},
            {"text": "\"Stay here,\" she said.\n\nHe nodded and sat down by the fire"},
            {"text": "The ship sailed across the sea towards the harbour"},
        ],
    )
    # Each gold answer is one short word against a long rambling one: even a random model puts
    # far more summed log-likelihood on the short choice, so `acc` must come out 1.0.
    _write_jsonl(
        tmp_path / "piqa_valid.jsonl",
        [
            {"goal": "How do I open a jar?", "sol1": "Twist.", "sol2": LONG},
            {"goal": "dresser", "sol1": LONG, "sol2": "Paint it. "},
            {"goal": "To boil water", "sol1": "Heat it.", "sol2": LONG},
        ],
    )
    (tmp_path / "piqa_valid_labels.lst").write_text("0\n1\n0\n", encoding="utf-8")
    # The third item's gold is the long answer, so it is wrong for any model: acc 2/3 on all,
    # 1.0 with limit=2.
    _write_jsonl(
        tmp_path / "arc_easy.jsonl",
        [
            {"choices": ["yes", LONG, LONG + "!", "no " + LONG], "query": "Question: Is water wet?", "gold": 0},
            {"choices": [LONG, LONG + "!", "sun", "no " + LONG], "query": "Question: What is hot?", "gold": 2},
            {"choices": ["cold", LONG, "ice", "snow"], "query": "Question: What is cold?\nAnswer:", "gold": 1},
        ],
    )
    return tmp_path


def test_task_loaders_build_lm_eval_prompts(task_dir):
    lambada = TASKS["lambada_openai"](task_dir)
    assert (lambada[1].context, lambada[1].choices) == (
        "\"Stay here,\" she said.\n\nHe nodded and sat down by the",
        ["fire"],
    )
    piqa = TASKS["piqa"](task_dir)
    assert piqa[1].context == "Question: dresser\nAnswer:"
    assert (piqa[1].choices, piqa[1].gold) == ([LONG, "Paint it. "], 1)
    arc = TASKS["arc_easy"](task_dir)
    assert arc[0].context == "Question: Is water wet?\nAnswer:"
    assert arc[2].context == "Question: What is cold?\nAnswer:"
    assert (arc[1].choices[2], arc[1].gold) == ("sun", 2)


def test_loglikelihood_matches_unbatched(model, tokenizer):
    pairs = [
        ("Question: Is water wet?\nAnswer:", " yes"),
        ("He opened the door and walked into the", " room"),
        ("A context that ends with a space ", "here"),
        ("Short", " continuation of several tokens, to vary the lengths in one batch"),
    ]
    got = loglikelihood(model, tokenizer, pairs, batch_size=3, progress=False)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        expected_ll, expected_greedy = _direct_loglikelihood(model, tokenizer, context, continuation)
        assert ll == pytest.approx(expected_ll, abs=1e-4)
        assert greedy == expected_greedy


def test_evaluate_tasks_matches_direct_scoring(model, tokenizer, task_dir):
    names = ["lambada_openai", "piqa", "arc_easy"]
    got = evaluate_tasks(model, tokenizer, names, task_dir, batch_size=4, progress=False)

    items = TASKS["lambada_openai"](task_dir)
    lambada = [_direct_loglikelihood(model, tokenizer, i.context, " " + i.choices[0]) for i in items]
    assert got["lambada_openai"]["acc"] == sum(greedy for _, greedy in lambada) / 3
    expected_ppl = math.exp(-sum(ll for ll, _ in lambada) / 3)
    assert got["lambada_openai"]["ppl"] == pytest.approx(expected_ppl, rel=1e-4)

    assert got["piqa"] == _direct_choice_metrics(model, tokenizer, TASKS["piqa"](task_dir))
    assert got["piqa"]["acc"] == 1.0
    assert got["arc_easy"] == _direct_choice_metrics(model, tokenizer, TASKS["arc_easy"](task_dir))
    assert got["arc_easy"]["acc"] == pytest.approx(2 / 3)


def test_evaluate_tasks_limit(model, tokenizer, task_dir):
    got = evaluate_tasks(model, tokenizer, ["arc_easy"], task_dir, limit=2, progress=False)
    assert got["arc_easy"] == _direct_choice_metrics(model, tokenizer, TASKS["arc_easy"](task_dir)[:2])
    assert got["arc_easy"]["acc"] == 1.0


def test_evaluate_tasks_errors(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="arc_easy.*lambada_openai.*piqa"):
        evaluate_tasks(model, tokenizer, ["hellaswag"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"piqa_valid\.jsonl.*--tasks-dir"):
        evaluate_tasks(model, tokenizer, ["piqa"], tmp_path)


def test_loaders_read_the_shipped_files():
    tasks_dir = shared_path("data/tasks")
    counts = {"lambada_openai": 5153, "piqa": 1838, "arc_easy": 2376}
    for name, count in counts.items():
        items = TASKS[name](tasks_dir)
        assert len(items) == count
        assert all(0 <= item.gold < len(item.choices) for item in items)
    assert TASKS["arc_easy"](tasks_dir)[0].context.endswith("food webs?\nAnswer:")


def test_format_table():
    table = format_table({"piqa": {"acc": 0.5, "acc_norm": 0.625}, "wikitext2": {"ppl": 12.3456}})
    assert table.splitlines() == [
        "task       metric      value",
        "piqa       acc        0.5000",
        "piqa       acc_norm   0.6250",
        "wikitext2  ppl       12.3456",
    ]


# --- real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_model_perplexity(tokenizer, gutenberg):
    # README: 41.54 on the first 300 windows in bf16; the first 20 alone give about 57.7.
    model = AutoModelForCausalLM.from_pretrained(gutenberg, dtype=torch.bfloat16).eval()
    ids = load_eval_ids(shared_path("data/gutenberg/heldout.txt"), tokenizer)
    ppl = perplexity(model, ids, seqlen=512, max_windows=20, progress=False)
    assert math.isfinite(ppl) and 20 < ppl < 80
