"""Cost of AutoScheme's scoring (one scheme per layer for a target average bit width), this project and
Intel AutoRound 0.16.1's AutoScheme in the same run, on a Llama-3-8B-shaped model with random weights.

Model: LlamaForCausalLM, hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocabulary
128256 (``--layers``/``--hidden``/... shrink it), random bf16 weights (seed 0), built on the GPU when
there is one (initialising 8B weights on the CPU takes minutes) and then moved to host memory: both tools
keep the model on the host and stream one block at a time to the GPU (our ``choose_schemes``; Intel's
default ``low_gpu_mem_usage``), so each starts from the state it expects. Options W2A16,W4A16,W8A16,
target 3.0 bits, 16 x 256 calibration tokens (Intel's defaults), each tool with its own batch size. Both
choose lm_head's scheme too (``quant_lm_head``): Intel's average counts lm_head, at 16 bits when it is
not quantized, which puts 3.0 out of its reach on this shape (its cheapest plan would be 3.11 bits).

Calibration: the same random token ids (seed 0) for both. Intel's AutoScheme takes only a dataset name or
a local .jsonl of texts (AutoRound rejects anything else with AutoScheme on), so the ids are written as
texts ``"t17 t4 ..."`` for an in-memory word-level tokenizer whose word ``t<i>`` is id ``i``: its loader
re-tokenizes them to exactly these ids (checked on the CPU: its batches hold our rows, possibly reordered).

What is timed (wall clock, GPU synchronized before and after; peaks reset just before):
- ours: ``quantize.autoscheme.choose_schemes`` whole: scope, block-input capture, the scores of every
  option (round-to-nearest, then gradients block by block), the exact allocation.
- Intel: ``BaseOrchestrator._gen_auto_scheme`` inside ``AutoRound(..., iters=0).quantize()``: its layer
  resolution, option range, delta-loss scoring of every option and the DP allocation. The run is stopped
  as that returns, so Intel's own quantization pass never runs. Two settings differ from a run on a
  checkpoint, both because this model exists only in memory: ``low_cpu_mem_usage=False`` (its default
  drops block weights and reloads them from the checkpoint files) and ``AR_ENABLE_AUTO_SCHEME_PARALLEL=0``
  (by default it spawns one process per option that loads the model from its checkpoint; serial scoring
  does the same work per option in this process, where its memory can be measured). Its score cache goes
  to a fresh folder, so nothing is reused between runs.

Each tool runs in its own subprocess: the peaks (GPU allocated and reserved, host RSS sampled every 20 ms)
then belong to that tool alone, allocator caches and CUDA context included, and Intel's process never
imports ``quantize``. Reported per tool: seconds, seconds per option (seconds / options), peak GPU
memory, host RSS growth over the RSS before the call (which already holds the model), extra memory = GPU
peak allocated + host growth (what the tool holds beyond the one host copy of the model; Intel states
1.1-1.5x the bf16 model as its overhead) and its ratio to the bf16 model size, and the plan's
average bits counted by ``quantize.autoscheme.layer_bits`` for both plans (16-bit scales; no zero point for
symmetric schemes, which Intel counts, so its plans read slightly below its own count). Ratios ours / Intel
follow. The JSON is rewritten after each tool, so a run cut short keeps what finished.

  python benchmarks/autoscheme_cost.py --deadline 280 --json autoscheme_cost.json        # 8B shape, GPU
  python benchmarks/autoscheme_cost.py --tools ours --options W2A16,W4A16 --bits 3.5
  python benchmarks/autoscheme_cost.py --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 \\
      --vocab 1024 --nsamples 2 --seqlen 32                                             # CPU smoke test

Dimensions must be multiples of 32 (the vocabulary too): Intel keeps any other layer at 16 bits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import speed  # this folder is first on sys.path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = speed.SHAPES["8b"]
VOCAB = 128256  # Llama-3's


class PlanReady(Exception):
    """Raised after Intel's scheme choice returns, to stop AutoRound before it quantizes."""

    def __init__(self, layer_config: dict):
        super().__init__("AutoScheme plan ready")
        self.layer_config = layer_config


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Measured:
    """Wall time, peak GPU memory and peak host RSS of the enclosed call."""

    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(0.02):
            self.host_peak = max(self.host_peak, rss())

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            self.gpu_start = self.torch.cuda.memory_allocated()
        self.host_before = self.host_peak = rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.time() - self.start
        self._stop.set()
        self._thread.join()
        self.host_peak = max(self.host_peak, rss())

    def row(self) -> dict:
        gb = 1e9
        cuda = self.cuda
        return {
            "seconds": self.seconds,
            "gpu_peak_gb": self.torch.cuda.max_memory_allocated() / gb if cuda else 0.0,
            "gpu_peak_reserved_gb": self.torch.cuda.max_memory_reserved() / gb if cuda else 0.0,
            "gpu_at_start_gb": self.gpu_start / gb if cuda else 0.0,
            "host_before_gb": self.host_before / gb,
            "host_growth_gb": (self.host_peak - self.host_before) / gb,
        }


def build_model(args, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=max(4096, args.seqlen), tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: no float32 copy of 8B weights
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().to("cpu")


def linear_shapes(model) -> dict[str, list[int]]:
    """Every linear layer: the blocks' and lm_head, the layers both tools choose for."""
    import torch

    return {n: [m.out_features, m.in_features] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def word_tokenizer(vocab: int):
    """Word ``t<i>`` is id ``i``, nothing added around a text: Intel's loader gets back our exact ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0", eos_token="t0")


def run_ours(model, ids, args, device, torch) -> tuple[dict, dict]:
    from quantize.autoscheme import choose_schemes
    from quantize.checkpoint import layout_for
    from quantize.model import find_blocks

    blocks = find_blocks(model)
    with Measured(torch) as m:
        plan = choose_schemes(model, blocks, args.options, args.bits, ids, quant_lm_head=True, layout_for=layout_for,
                              device=device, progress=False)
    return m.row() | {"score_s": plan.score_seconds}, plan.layer_config


def run_intel(model, ids, args, device, torch) -> tuple[dict, dict]:
    from auto_round import AutoRound, AutoScheme
    from auto_round.compressors.base import BaseOrchestrator

    texts = Path(tempfile.mkdtemp(prefix="autoscheme-cost-")) / "calib.jsonl"
    texts.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in row.tolist())}) + "\n" for row in ids))
    choose = BaseOrchestrator._gen_auto_scheme
    measured = Measured(torch)

    def timed(self):
        with measured:
            layer_config = choose(self)
        raise PlanReady(layer_config)

    BaseOrchestrator._gen_auto_scheme = timed
    scheme = AutoScheme(avg_bits=args.bits, options=tuple(args.options.split(",")), nsamples=args.nsamples,
                        seqlen=args.seqlen, low_cpu_mem_usage=False)
    ar = AutoRound(model, tokenizer=word_tokenizer(args.vocab), scheme=scheme, dataset=str(texts), iters=0,
                   nsamples=args.nsamples, seqlen=args.seqlen, quant_lm_head=True,
                   device_map=0 if device.type == "cuda" else "cpu", disable_model_free=True)
    try:
        ar.quantize()
    except PlanReady as ready:
        return measured.row(), ready.layer_config
    raise RuntimeError("AutoRound finished without calling _gen_auto_scheme: no AutoScheme plan was made")


def worker(args) -> dict:
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model = build_model(args, device)
    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    out = {"tool": args.worker, "build_s": time.time() - t0,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "model_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
           "shapes": linear_shapes(model)}
    run = run_ours if args.worker == "ours" else run_intel
    row, layer_config = run(model, ids, args, device, torch)
    # Only the fields both tools' configs share: Intel's also carry data types, scale dtypes and flags.
    out["plan"] = {n: [c["bits"], c.get("group_size"), c.get("sym")] for n, c in layer_config.items() if n in out["shapes"]}
    return out | row


def plan_bits(row: dict) -> tuple[float, dict[str, int]]:
    """Average bits per weight of a plan, counted one way for both tools, and layers per bit width."""
    from quantize.autoscheme import average_bits
    from quantize.layer_config import KEEP_BITS
    from quantize.scheme import get_scheme

    schemes, counts = {}, {}
    for name, (bits, group_size, sym) in row["plan"].items():
        schemes[name] = None if bits >= KEEP_BITS else get_scheme("W4A16", bits=bits, group_size=group_size, sym=sym)
        counts[f"{bits}-bit"] = counts.get(f"{bits}-bit", 0) + 1
    return average_bits({n: tuple(s) for n, s in row["shapes"].items()}, schemes), counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tools", default="ours,intel", help="comma list of ours, intel")
    p.add_argument("--options", default="W2A16,W4A16,W8A16", help="AutoScheme's options (AutoRound's spellings)")
    p.add_argument("--bits", type=float, default=3.0, help="target average bits per weight")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    p.add_argument("--heads", type=int, default=HEADS)
    p.add_argument("--kv-heads", type=int, default=KV_HEADS)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start: no tool starts after it, and a tool still running then is stopped")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return

    start = time.time()
    n_options = len(args.options.split(","))
    info = {"options": args.options, "target_bits": args.bits, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")},
            "rows": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))

    result = Path(tempfile.gettempdir()) / f"autoscheme-cost-{os.getpid()}.json"
    for tool in args.tools.split(","):
        left = None if args.deadline is None else args.deadline - (time.time() - start)
        if left is not None and left <= 0:
            print(f"deadline reached: skipping {tool}", flush=True)
            info["rows"].append({"tool": tool, "error": "skipped: deadline reached"})
            save()
            continue
        print(f"--- {tool}", flush=True)
        result.unlink(missing_ok=True)
        # Intel's score cache in a fresh folder (no reuse); its environment overrides of nsamples/seqlen/batch
        # would silently replace the arguments, so they are dropped.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AR_AUTO_SCHEME_")}
        env.update(PYTHONUNBUFFERED="1", QUANTIZE_LLM_NO_AUTOLOAD="1", AR_ENABLE_AUTO_SCHEME_PARALLEL="0",
                   AR_AUTO_SCHEME_CACHE=tempfile.mkdtemp(prefix="autoscheme-cache-"))
        # Everything is local; on a machine without network a hub lookup would wait for its timeouts.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", tool, "--result", str(result)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, timeout=left)
            error = None if proc.returncode == 0 and result.exists() else f"worker exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"stopped at the deadline, {time.time() - t0:.0f} s after the worker started (model build included)"
        if error:
            print(f"{tool}: {error}", flush=True)
            info["rows"].append({"tool": tool, "error": error})
            save()
            continue
        row = json.loads(result.read_text())
        for key in ("device", "versions", "model_gb"):
            info[key] = row.pop(key)
        if tool == "intel":
            from importlib.metadata import version

            info["versions"]["auto_round"] = version("auto-round")
        row["n_options"] = n_options
        row["seconds_per_option"] = row["seconds"] / n_options
        row["extra_gb"] = row["gpu_peak_gb"] + row["host_growth_gb"]
        row["extra_over_model"] = row["extra_gb"] / info["model_gb"]
        row["avg_bits"], row["layers_per_width"] = plan_bits(row)
        del row["plan"], row["shapes"]
        info["rows"].append(row)
        print(f"{tool}: {row['seconds']:.1f} s ({row['seconds_per_option']:.1f} s per option), GPU peak "
              f"{row['gpu_peak_gb']:.2f} GB, host +{row['host_growth_gb']:.2f} GB, avg bits {row['avg_bits']:.4f}", flush=True)
        save()
    result.unlink(missing_ok=True)

    print(f"\n{info.get('device', '?')}, model {info.get('model_gb', float('nan')):.3g} GB bf16, options {args.options}, "
          f"target {args.bits:g} bits, {args.nsamples} x {args.seqlen} tokens")
    print(f"{'tool':6} {'seconds':>8} {'s/option':>9} {'GPU GB':>7} {'(resv)':>7} {'host +GB':>9} {'extra GB':>9} "
          f"{'x model':>8} {'avg bits':>9}  layers")
    for r in info["rows"]:
        if "error" in r:
            print(f"{r['tool']:6} {r['error']}")
            continue
        widths = ", ".join(f"{k} {v}" for k, v in sorted(r["layers_per_width"].items()))
        print(f"{r['tool']:6} {r['seconds']:8.1f} {r['seconds_per_option']:9.2f} {r['gpu_peak_gb']:7.2f} "
              f"{r['gpu_peak_reserved_gb']:7.2f} {r['host_growth_gb']:9.2f} {r['extra_gb']:9.2f} "
              f"{r['extra_over_model']:8.2f} {r['avg_bits']:9.4f}  {widths}")
    by = {r["tool"]: r for r in info["rows"] if "error" not in r}
    if "ours" in by and "intel" in by:
        o, i = by["ours"], by["intel"]
        info["ratios"] = {k: o[k] / i[k] if i[k] else None for k in ("seconds", "gpu_peak_gb", "gpu_peak_reserved_gb", "extra_gb")}
        print("ours / Intel: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in info["ratios"].items()))
    save()


if __name__ == "__main__":
    main()
