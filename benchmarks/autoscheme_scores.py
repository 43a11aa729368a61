"""Which AutoScheme score predicts what quantizing one layer really costs: rank correlations on a real model.

For every linear layer of the blocks and every option, the real cost is measured directly: that layer alone
rounded to the option (round-to-nearest, the project's numerics), every other layer full precision, and the
mean next-token loss on held-out text compared with the unquantized model's. Each score is then computed
for the same (layer, option) pairs from the calibration text (16 x 256 tokens by default, AutoRound's
scoring size), with ``d = W - Q(W)`` and per-sample loss gradients ``g``:

- ``taylor_q_signed`` (ours, quantize.autoscheme): gradients with the whole model at the option,
  ``sum over batches of |sum g * d|`` (batches of ``SCORE_BATCH`` = 4 samples);
- ``taylor_q_abs`` (AutoRound's DeltaLoss): the same gradients, ``sum |g * d|`` weight by weight;
- ``taylor_fp_signed``: gradients of the unquantized model, ``sum over batches of |sum g * d|``;
- ``fisher``: the unquantized model's per-sample gradients squared (empirical Fisher diagonal), a
  second-order estimate ``1/2 sum_s sum (g_s * d)^2`` (the first-order term vanishes at a minimum).

Printed per option and over all pairs: Spearman's rank correlation of each score with the real loss change
(1.0: it orders the layers exactly as quantizing them does). The whole model runs in float32 on the CPU.

  python benchmarks/autoscheme_scores.py --json benchmarks/results/autoscheme_scores_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SCORES = ("taylor_q_signed", "taylor_q_abs", "taylor_fp_signed", "fisher")


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties: average ranks)."""

    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for v in t.unique():  # average the ranks of equal values
            tie = t == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def mean_loss(model: nn.Module, ids: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids), batch):
            x = ids[b : b + batch]
            logits = model(x).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return total / count


def sample_gradients(model: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor):
    """Yields, per calibration sample, each layer's weight gradient of that sample's mean loss."""
    for row in ids:
        model.zero_grad(set_to_none=True)
        x = row[None]
        logits = model(x).logits[:, :-1].float()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        yield {n: m.weight.grad for n, m in layers.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/gutenberg-llama-29m"))
    p.add_argument("--calib", default=str(SHARED / "data/gutenberg/calib.txt"))
    p.add_argument("--heldout", default=str(SHARED / "data/gutenberg/heldout.txt"))
    p.add_argument("--options", default="W2A16,W4A16")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=40, help="held-out 512-token windows for the real loss change")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from quantize.autoscheme import SCORE_BATCH, _quantized, parse_options
    from quantize.calib import calibration_ids
    from quantize.eval import load_eval_ids
    from quantize.model import find_blocks, load_model

    start = time.time()
    model, tok = load_model(args.model)
    model.float().eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    blocks = find_blocks(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(blocks.prefix + ".")}
    calib = calibration_ids(args.calib, tok, args.nsamples, args.seqlen, seed=42)
    flat = load_eval_ids(args.heldout, tok)
    heldout = flat[: args.windows * 512].reshape(args.windows, 512)
    base_loss = mean_loss(model, heldout)
    full = {n: m.weight.detach().clone() for n, m in layers.items()}
    info = {"model": args.model, "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "windows": args.windows,
            "base_loss": base_loss, "options": {}}
    for option in parse_options(args.options):
        q = {n: _quantized(w, option) for n, w in full.items()}
        delta = {n: full[n] - q[n] for n in layers}
        real = {}
        for n, m in layers.items():  # one layer quantized at a time
            m.weight.data = q[n]
            real[n] = mean_loss(model, heldout) - base_loss
            m.weight.data = full[n]
        scores = {k: {n: 0.0 for n in layers} for k in SCORES}
        for quantized in (False, True):
            for n, m in layers.items():
                m.weight.data = q[n] if quantized else full[n]
                m.weight.requires_grad_(True)
            batch_sum = {n: 0.0 for n in layers}
            for s, grads in enumerate(sample_gradients(model, layers, calib)):
                for n, g in grads.items():
                    gd = g * delta[n]
                    batch_sum[n] += gd.sum().item() / SCORE_BATCH  # the mean loss of a scoring batch
                    if quantized:
                        scores["taylor_q_abs"][n] += gd.abs().sum().item()
                    else:
                        scores["fisher"][n] += 0.5 * gd.square().sum().item()
                if s % SCORE_BATCH == SCORE_BATCH - 1 or s == len(calib) - 1:
                    for n in layers:
                        scores["taylor_q_signed" if quantized else "taylor_fp_signed"][n] += abs(batch_sum[n])
                        batch_sum[n] = 0.0
            for n, m in layers.items():
                m.weight.requires_grad_(False)
                m.weight.data = full[n]
        names = list(layers)
        corr = {k: spearman([v[n] for n in names], [real[n] for n in names]) for k, v in scores.items()}
        info["options"][option.name] = {"spearman": corr, "real_loss_change": real, "scores": scores}
        print(f"{option.name}: Spearman with the real loss change over {len(names)} layers: "
              + ", ".join(f"{k} {v:.3f}" for k, v in corr.items()), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=1))
    if len(info["options"]) > 1:  # all pairs together: what the allocation compares across options too
        pooled = {}
        for k in SCORES:
            xs = [v for o in info["options"].values() for v in o["scores"][k].values()]
            ys = [v for o in info["options"].values() for v in o["real_loss_change"].values()]
            pooled[k] = spearman(xs, ys)
        info["spearman_all_pairs"] = pooled
        print("all (layer, option) pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in pooled.items()))
    info["seconds"] = time.time() - start
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
