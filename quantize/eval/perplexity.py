"""Perplexity of a causal LM over non-overlapping, fixed-length token windows."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


def load_eval_ids(path: str | Path, tokenizer, max_chars: int | None = None) -> torch.LongTensor:
    """Tokenize an evaluation text into one flat id sequence.

    The text is split on blank lines and every piece is encoded with its "\\n\\n" separator
    re-attached. Published numbers (e.g. the reference model's README) use exactly this
    convention, and perplexity is sensitive to it, so do not "simplify" it into one big encode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text not found: {path}")
    text = path.read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise ValueError(f"evaluation text is empty: {path}")
    pieces = [piece + "\n\n" for piece in text.split("\n\n")]
    # One batched call lets the fast tokenizer work in parallel: seconds for a few MB of text.
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for piece in encoded for i in piece], dtype=torch.long)


@torch.inference_mode()
def perplexity(
    model,
    ids: torch.LongTensor,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """exp(mean per-window cross-entropy) over the first `max_windows` windows of `seqlen` tokens.

    Each window is scored on its own (no context carried over), predicting tokens 1..seqlen-1;
    the incomplete tail is dropped.
    """
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(
            f"perplexity needs at least one window of {seqlen} tokens, got {ids.numel()} tokens"
            + (f" and max_windows={max_windows}" if max_windows is not None else "")
        )
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device

    losses = []
    starts = range(0, n_windows, batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        # float32 before the softmax: bf16 log-probabilities shift perplexity visibly.
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        losses.append(loss.mean(dim=1).cpu())
    return math.exp(torch.cat(losses).double().mean().item())
