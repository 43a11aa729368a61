"""Zero-shot accuracy on local task files, following lm-evaluation-harness conventions.

Every task reduces to log-likelihood requests (context, continuation), as in lm-eval:
- multiple choice (piqa, arc_easy): one request per choice, continuation = " " + choice;
  `acc` picks the highest summed log-likelihood, `acc_norm` divides it by the choice's length
  in characters (lm-eval uses len(choice), without the leading space).
- cloze (lambada_openai): a single continuation; `acc` = greedy decoding reproduces it exactly,
  `ppl` = exp(-mean log-likelihood of the target word).
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class Item:
    """One task example: `context + " " + choices[i]` is the text scored for choice i."""

    context: str
    choices: list[str]
    gold: int = 0


Loader = Callable[[Path], list[Item]]
TASKS: dict[str, Loader] = {}


def register_task(name: str) -> Callable[[Loader], Loader]:
    def register(loader: Loader) -> Loader:
        TASKS[name] = loader
        return loader

    return register


def _task_file(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path} (point --tasks-dir at the folder with {name})")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@register_task("lambada_openai")
def load_lambada_openai(data_dir: Path) -> list[Item]:
    items = []
    for row in _read_jsonl(_task_file(data_dir, "lambada_openai_test.jsonl")):
        context, word = row["text"].rsplit(" ", 1)
        items.append(Item(context, [word]))
    return items


@register_task("piqa")
def load_piqa(data_dir: Path) -> list[Item]:
    rows = _read_jsonl(_task_file(data_dir, "piqa_valid.jsonl"))
    labels_path = _task_file(data_dir, "piqa_valid_labels.lst")
    labels = [int(line) for line in labels_path.read_text(encoding="utf-8").split()]
    if len(labels) != len(rows):
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(rows)} piqa items")
    return [
        Item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], label)
        for row, label in zip(rows, labels)
    ]


@register_task("arc_easy")
def load_arc_easy(data_dir: Path) -> list[Item]:
    items = []
    for row in _read_jsonl(_task_file(data_dir, "arc_easy.jsonl")):
        # The shipped file has "Question: ..." without the answer cue; lm-eval's prompt has both.
        query = row["query"]
        if not query.startswith("Question:"):
            query = f"Question: {query}"
        if not query.endswith("Answer:"):
            query += "\nAnswer:"
        items.append(Item(query, list(row["choices"]), int(row["gold"])))
    return items


def _max_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 2048


def _encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's encoding: continuation tokens are those of the whole string beyond the context's.

    Trailing whitespace moves from the context to the continuation first, so " word" stays one
    token for BPE tokenizers. If a merge crosses the boundary anyway, the continuation simply starts at
    the context's token count, as in lm-eval.
    """
    contexts = [context.rstrip() for context, _ in pairs]
    wholes = [context + continuation for context, continuation in pairs]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(wholes, add_special_tokens=False)["input_ids"]
    return [(ctx, whole[len(ctx) :]) for ctx, whole in zip(context_ids, whole_ids)]


@torch.inference_mode()
def loglikelihood(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """For each (context, continuation): summed log p(continuation | context), and whether greedy
    decoding from the context reproduces the continuation exactly."""
    device = next(model.parameters()).device
    max_length = _max_length(model)
    requests = []
    for context_ids, continuation_ids in _encode_pairs(tokenizer, pairs):
        if not context_ids or not continuation_ids:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        if len(continuation_ids) > max_length:
            raise ValueError(f"a {len(continuation_ids)}-token continuation exceeds the model's {max_length} tokens")
        # Truncate from the left; the last token is only ever a target, never an input.
        requests.append(((context_ids + continuation_ids)[-(max_length + 1) : -1], continuation_ids))

    # Longest first, as lm-eval does: similar lengths share a batch, so little padding is wasted.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        width = len(requests[batch[0]][0])
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            inputs = requests[i][0]
            tokens[row, : len(inputs)] = torch.tensor(inputs)
            mask[row, : len(inputs)] = 1
        # Right padding keeps every real token at its unpadded position, so no position ids needed.
        logits = model(tokens.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(batch):
            inputs, continuation = requests[i]
            end = len(inputs)
            logprobs = F.log_softmax(logits[row, end - len(continuation) : end].float(), dim=-1).cpu()
            target = torch.tensor(continuation)
            ll = logprobs.gather(1, target[:, None]).sum().item()
            results[i] = (ll, bool((logprobs.argmax(dim=-1) == target).all()))
    return results


def _score(items: list[Item], results: list[tuple[float, bool]]) -> dict[str, float]:
    if all(len(item.choices) == 1 for item in items):
        lls = [ll for ll, _ in results]
        return {
            "acc": sum(greedy for _, greedy in results) / len(items),
            "ppl": math.exp(-sum(lls) / len(lls)),
        }
    acc = acc_norm = 0
    it = iter(results)
    for item in items:
        lls = [next(it)[0] for _ in item.choices]
        normed = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
        # max() over indices keeps the first of equal scores, like np.argmax in lm-eval.
        acc += max(range(len(lls)), key=lls.__getitem__) == item.gold
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == item.gold
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: Path,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per task, on the first `limit` items of each task (all if None)."""
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")
    metrics = {}
    for name in tasks:
        items = TASKS[name](Path(data_dir))[:limit]
        if not items:
            raise ValueError(f"task {name} has no items in {data_dir}")
        pairs = [(item.context, " " + choice) for item in items for choice in item.choices]
        results = loglikelihood(model, tokenizer, pairs, batch_size, progress, desc=name)
        metrics[name] = _score(items, results)
    return metrics
