"""A model larger than comfortable: quantize a 14B-shaped Llama with ``--stream`` and report its memory.

Writes a Llama of the given shape with random bf16 weights (seed 0, std 0.02, norms at 1) to disk in 5 GB
shards with the repository's test tokenizer, one tensor at a time (generated on the GPU when there is one),
then runs ``python -m quantize MODEL --scheme W4A16 --stream`` (default preset) in a subprocess and reads
its log: seconds per block, peak host memory (ru_maxrss) against the model's size, peak GPU memory. With
``--deadline S`` it presses Ctrl-C S seconds after it started (the run stops at a block boundary and keeps its
state); the next call resumes it. Once the checkpoint exists it is loaded with transformers on the GPU
(``import quantize``), a forward pass checked finite and a few tokens generated.

  python benchmarks/large_model.py --dir /tmp/large --deadline 540 --json out.json     # 14B shape
  python benchmarks/large_model.py --arch qwen3_moe --dir /tmp/moe --json moe.json      # 8 Qwen3-30B-A3B layers
  python benchmarks/large_model.py --dir /tmp/tiny --layers 2 --hidden 256 --intermediate 512 --heads 4 \\
      --kv-heads 2 --vocab 8192 --device cpu --extra "--iters 2 --nsamples 4 --seqlen 64"  # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "tokenizer"
# head_dim 0: hidden / heads
ARCH_DEFAULTS = {
    "llama": dict(layers=48, hidden=5120, intermediate=13824, heads=40, kv_heads=8, head_dim=0, vocab=32000),
    "qwen3_moe": dict(layers=8, hidden=2048, intermediate=6144, heads=32, kv_heads=4, head_dim=128, vocab=32000,
                      experts=128, moe_intermediate=768, top_k=8),
}


def llama_shapes(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    return shapes


def qwen3_moe_shapes(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, experts: int,
                     moe_intermediate: int) -> dict:
    """Qwen3-MoE's tensors as its checkpoints store them: one tensor per expert and projection."""
    dense = llama_shapes(layers, hidden, 0, heads, kv_heads, head_dim)
    shapes = {name: shape for name, shape in dense.items() if ".mlp." not in name}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
                       p + "mlp.gate.weight": (experts, hidden)})
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            shapes.update({q + "gate_proj.weight": (moe_intermediate, hidden), q + "up_proj.weight": (moe_intermediate, hidden),
                           q + "down_proj.weight": (hidden, moe_intermediate)})
    return shapes


def write_model(folder: Path, args, device: str, shard_bytes: int = 5 * 10**9) -> int:
    """A random bf16 model in safetensors shards, written tensor by tensor; returns its bytes."""
    from transformers import AutoTokenizer, LlamaConfig, Qwen3MoeConfig

    from quantize.export.hf_folder import write_weights

    head_dim = args.head_dim or args.hidden // args.heads
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, head_dim=head_dim, vocab_size=args.vocab,
                  max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    if args.arch == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=args.intermediate, moe_intermediate_size=args.moe_intermediate,
                                num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True, **common)
        body = qwen3_moe_shapes(args.layers, args.hidden, args.heads, args.kv_heads, head_dim, args.experts,
                                args.moe_intermediate)
    else:
        config = LlamaConfig(intermediate_size=args.intermediate, **common)
        body = llama_shapes(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, head_dim)
    shapes = {"model.embed_tokens.weight": (args.vocab, args.hidden), **body,
              "model.norm.weight": (args.hidden,), "lm_head.weight": (args.vocab, args.hidden)}
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator(device).manual_seed(0)

    def tensor(shape):
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    # Deferred tensors: each is drawn when its shard is written, so one shard is in memory at a time.
    write_weights(tmp, {name: lambda shape=shape: tensor(shape) for name, shape in shapes.items()}, shard_bytes)
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(tmp)
    tmp.rename(folder)
    return sum(math.prod(shape) * 2 for shape in shapes.values())


def quantize(model: Path, ckpt: Path, log: Path, deadline: float | None, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "quantize", str(model), "--scheme", "W4A16", "--stream", "--quiet", "--no-eval",
           "--dataset", "bundled", "--output_dir", str(ckpt), *extra]
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # stops once the block in progress is saved
            proc.wait()
    # the largest resident set of any child waited for: this run's, whether or not it reached its summary
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"returncode": proc.returncode, "seconds": round(time.time() - start, 1), "maxrss_gib": round(maxrss, 2)}


def read_log(log: Path) -> dict:
    text = log.read_text()
    blocks = {int(m[1]): float(m[3]) for m in re.finditer(r"block (\d+)/(\d+): .*?\(([\d.]+) s\)", text)}
    out = {"block_seconds": [blocks[k] for k in sorted(blocks)], "resumed": re.findall(r"resuming from block \d+/\d+", text)}
    if m := re.search(r"peak host ([\d.]+) GiB(?:, peak GPU ([\d.]+) GiB)?", text):
        out["peak_host_gib"] = float(m[1])
        out["peak_gpu_gib"] = float(m[2]) if m[2] else None
    return out


def check_load(ckpt: Path, device: str) -> dict:
    """Load the checkpoint with transformers, one forward pass and a short greedy generation."""
    code = f"""
import json, time, torch, quantize
from transformers import AutoModelForCausalLM
t = time.time()
m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, device_map={device!r}, dtype=torch.bfloat16)
load = time.time() - t
ids = torch.arange(1, 33, device={device!r}).view(1, -1)
with torch.no_grad():
    logits = m(ids).logits
out = m.generate(ids, max_new_tokens=8, do_sample=False)
kinds = sorted({{type(x).__name__ for x in m.modules() if 'Linear' in type(x).__name__}})
print(json.dumps({{"load_s": round(load, 1), "logits_finite": bool(torch.isfinite(logits).all()),
                  "new_tokens": out[0, 32:].tolist(), "linear_classes": kinds}}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        return {"error": run.stderr[-3000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="model, checkpoint and log go here")
    p.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="llama",
                   help="llama: the 14B shape by default; qwen3_moe: 8 layers of Qwen3-30B-A3B's shape")
    for flag in ("layers", "hidden", "intermediate", "heads", "kv-heads", "head-dim", "vocab", "experts",
                 "moe-intermediate", "top-k"):
        p.add_argument("--" + flag, type=int, default=None, help="default: the architecture's (see ARCH_DEFAULTS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--deadline", type=float, default=None, help="press Ctrl-C on the run this many seconds after this script started")
    p.add_argument("--extra", default="", help="more quantize flags, e.g. '--iters 2'")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start = time.time()

    model, ckpt, log = args.dir / "model", args.dir / "ckpt", args.dir / "quantize.log"
    args.dir.mkdir(parents=True, exist_ok=True)
    report = {"arch": args.arch, "shape": {k: getattr(args, k) for k in ARCH_DEFAULTS[args.arch]}}
    if not model.exists():
        t = time.time()
        write_model(model, args, args.device)
        report["write_s"] = round(time.time() - t, 1)
    report["model_gib"] = round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30, 2)
    if not ckpt.exists():
        left = None if args.deadline is None else max(1.0, args.deadline - (time.time() - start))
        report["run"] = quantize(model, ckpt, log, left, args.extra.split() + ["--device", args.device])
    report.update(read_log(log))
    if "peak_host_gib" in report:
        report["peak_host_share_of_model"] = round(report["peak_host_gib"] / report["model_gib"], 3)
    if ckpt.exists():
        report["checkpoint_gib"] = round(sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30, 2)
        report["transformers"] = check_load(ckpt, args.device)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
