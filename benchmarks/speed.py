"""Tuning speed per decoder block, this project and Intel AutoRound in the same run, on random weights.

Llama-2-7B-shaped blocks (hidden 4096, intermediate 11008, 32 heads), Llama-3-8B-shaped (4096/14336, 32
heads, GQA 8 KV heads) and Llama-2/3-70B-shaped (8192/28672, 64 heads, 8 KV heads): a LlamaForCausalLM of
``--blocks`` such blocks with a small vocabulary and random bf16 weights (seed 0), the same random token ids
(seed 0) fed to both tools. Default preset: W4A16 g128 sym, 200 iters, 128 x 2048 tokens, batch 8.

Each tool runs in its own subprocess (clean peak host memory, Intel never sees ``import quantize``):
- seconds per block: from the end of block i-1's tuning to the end of block i's (its targets, its tuning
  and the previous block's quantized outputs included), GPU synchronized; block 0 also carries the
  compile warm-up, so the steady-state figure is block 1's; both are reported.
- peak GPU memory (torch.cuda.max_memory_allocated over the whole run), peak host memory (ru_maxrss).
- a projection: 32 blocks for 7B/8B, 80 blocks for 70B (from the 70B shape if run, else the 7B seconds
  scaled by the block's weight count, marked as estimated).

  python benchmarks/speed.py --shapes 7b,8b --tools ours,intel --json speed.json
  python benchmarks/speed.py --shapes tiny --iters 2 --nsamples 16 --seqlen 128   # CPU smoke test
  python benchmarks/speed.py --shapes 7b --tools ours --profile profile.txt         # torch.profiler, one block
  python benchmarks/speed.py --shapes 7b --preset auto-round-light                   # 50 iters, lr 5e-3, both tools
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # hidden, intermediate, heads, kv heads, model blocks for the projection
    "7b": (4096, 11008, 32, 32, 32),
    "8b": (4096, 14336, 32, 8, 32),
    "70b": (8192, 28672, 64, 8, 80),
    "tiny": (256, 768, 4, 2, 32),
}
ROOT = Path(__file__).resolve().parents[1]
# Intel's AutoRound wants a tokenizer with a model object: the reference model's (vocabulary 8192).
TOKENIZER = ROOT / ".gpu" / "model" if (ROOT / ".gpu" / "model").exists() else ROOT / ".." / "shared" / "models" / "gutenberg-llama-29m"
VOCAB = 8192
# Presets both tools share (Intel's default and `--light` recipes are ours); the parent reads their
# iterations and learning rate from quantize.presets and hands them to the workers.
PRESETS = ("auto-round", "auto-round-light")


def block_weights(shape: str) -> int:
    h, i, heads, kv, _ = SHAPES[shape]
    head_dim = h // heads
    return 2 * h * h + 2 * h * kv * head_dim + 3 * h * i


def build_model(shape: str, blocks: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, heads, kv, _ = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=blocks,
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def token_ids(nsamples: int, seqlen: int):
    import torch

    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def worker(args) -> dict:
    """One tool on one shape, in this process; returns the measurements."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t_build = time.time()
    model = build_model(args.shape, args.blocks)
    ids = token_ids(args.nsamples, args.seqlen)
    out = {"tool": args.tool, "shape": args.shape, "build_s": time.time() - t_build}
    marks: list[tuple[str, float]] = []

    def timed(fn, name):
        def wrapper(*a, **k):
            sync()
            marks.append((f"{name}_start", time.time()))
            r = fn(*a, **k)
            sync()
            marks.append((f"{name}_end", time.time()))
            return r

        return wrapper

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.tool == "intel":
        from auto_round import AutoRound
        from auto_round.algorithms.quantization.sign_round.quantizer import SignRoundQuantizer

        SignRoundQuantizer.quantize_block = timed(SignRoundQuantizer.quantize_block, "block")
        from transformers import AutoTokenizer

        kw = {"tokenizer": AutoTokenizer.from_pretrained(args.tokenizer)}
        ar = AutoRound(
            model, bits=4, group_size=128, sym=True, iters=args.iters, lr=args.lr, nsamples=args.nsamples, seqlen=args.seqlen,
            batch_size=args.batch_size, dataset=[row.unsqueeze(0) for row in ids], seed=42,
            device_map=0 if cuda else "cpu", disable_model_free=True, **kw,
        )
        sync()
        t0 = time.time()
        ar.quantize()
    else:
        import quantize.quantizer as qz
        from quantize.layer_config import plan_layers
        from quantize.model import find_blocks
        from quantize.presets import get_preset
        from quantize.scheme import get_scheme

        qz.tune_block = timed(qz.tune_block, "block")
        blocks = find_blocks(model)
        plan = plan_layers(model, blocks.prefix, get_scheme("W4A16"))
        compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
        cfg = get_preset(args.preset, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                         batch_size=args.batch_size, compile=compile_flag, fp8_grads=args.fp8_grads)
        out["compile"], out["fp8_grads"] = args.compile, args.fp8_grads
        sync()
        t0 = time.time()
        qz.quantize_model(model, blocks, plan, ids, cfg, device, progress=False)
    sync()
    out["total_s"] = time.time() - t0
    starts = [t for n, t in marks if n == "block_start"]
    ends = [t for n, t in marks if n == "block_end"]
    out["tune_s"] = [e - s for s, e in zip(starts, ends)]
    # Block i's time: from the end of block i-1's tuning to the end of its own (targets, inputs, tuning).
    out["block_s"] = [ends[0] - t0] + [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    out["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9 if cuda else None
    out["peak_host_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if args.profile and args.tool == "ours":
        out["profile"] = profile_block(model, ids, args, device)
    return out


def profile_block(model, ids, args, device) -> str:
    """torch.profiler over ``--profile-iters`` tuning steps of block 0 (after 3 warm-up steps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from quantize.model import block_output, capture_block_inputs, find_blocks
    from quantize.presets import get_preset
    from quantize.scheme import get_scheme
    from quantize.signround import tune_block

    blocks = find_blocks(model)
    n = max(args.batch_size * 2, 8)
    x, kwargs = capture_block_inputs(model, blocks, ids[:n], device, torch.bfloat16)
    block = blocks.modules[0].to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        y = torch.cat([block_output(block(c, **kwargs)) for c in x.split(args.batch_size)])
    layers = {name: get_scheme("W4A16") for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    gen = torch.Generator().manual_seed(0)
    weights = {k: v.detach().clone() for k, v in block.state_dict().items()}

    def run(iters):
        block.load_state_dict(weights)
        cfg = get_preset("auto-round", iters=iters, nsamples=n, seqlen=args.seqlen, batch_size=args.batch_size, compile=compile_flag)
        tune_block(block, layers, x, y, kwargs, cfg, gen)

    run(3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run(args.profile_iters)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=35, max_name_column_width=70)
    Path(args.profile).write_text(f"{args.shape} W4A16, {args.profile_iters} steps of batch {args.batch_size} x {args.seqlen}, compile={args.compile}\n{table}")
    return args.profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="7b,8b")
    p.add_argument("--tools", default="ours,intel", help="comma list of ours, intel, ours-eager (ours with --compile off), ours-fp8 (ours with float8 backward products)")
    p.add_argument("--preset", choices=PRESETS, default="auto-round", help="recipe for both tools")
    p.add_argument("--iters", type=int, default=None, help="default: the preset's")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of one block of ours here")
    p.add_argument("--profile-iters", type=int, default=10)
    p.add_argument("--deadline", type=float, default=None, help="seconds: start no new worker after this")
    p.add_argument("--json", default=None)
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="for Intel's AutoRound (its vocabulary must be 8192)")
    p.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fp8-grads", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    from quantize.presets import get_preset

    recipe = get_preset(args.preset, iters=args.iters)
    args.iters, args.lr = recipe.iters, recipe.lr

    start = time.time()
    import torch

    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {"torch": torch.__version__}, "preset": args.preset, "iters": args.iters, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "batch_size": args.batch_size, "rows": []}
    try:
        import transformers

        info["versions"]["transformers"] = transformers.__version__
        from importlib.metadata import version

        info["versions"]["auto_round"] = version("auto-round")
    except Exception:  # noqa: BLE001
        pass

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))

    result_file = Path(tempfile.gettempdir()) / f"speed-worker-{os.getpid()}.json"
    for shape in args.shapes.split(","):
        for tool in args.tools.split(","):
            if args.deadline is not None and time.time() - start > args.deadline:
                print(f"deadline reached: skipping {shape} {tool}", flush=True)
                info.setdefault("skipped", []).append(f"{shape}:{tool}")
                continue
            compile_mode = "off" if tool == "ours-eager" else args.compile
            cmd = [sys.executable, __file__, "--worker", "--tool", tool.split("-")[0], "--shape", shape,
                   "--preset", args.preset, "--iters", str(args.iters), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--batch-size", str(args.batch_size), "--blocks", str(args.blocks), "--compile", compile_mode,
                   "--result", str(result_file), "--tokenizer", args.tokenizer, "--profile-iters", str(args.profile_iters)]
            if args.lr is not None:
                cmd += ["--lr", str(args.lr)]
            if tool == "ours-fp8":
                cmd.append("--fp8-grads")
            if args.profile and tool.startswith("ours"):
                cmd += ["--profile", str(Path(args.profile).with_suffix(f".{shape}.{tool}.txt"))]
            print(f"--- {shape} {tool}", flush=True)
            if result_file.exists():
                result_file.unlink()
            # The opt-out keeps an installed quantize-llm from registering itself in Intel's worker.
            proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", "QUANTIZE_LLM_NO_AUTOLOAD": "1"})
            if proc.returncode != 0 or not result_file.exists():
                info["rows"].append({"shape": shape, "tool": tool, "error": f"worker exit {proc.returncode}"})
                save()
                continue
            row = json.loads(result_file.read_text())
            row["tool"] = tool
            row["block_weights"] = block_weights(shape)
            steady = row["block_s"][1] if len(row["block_s"]) > 1 else row["block_s"][0]
            row["s_per_block"] = steady
            nblocks = SHAPES[shape][4]
            row["projection_min"] = {shape: nblocks * steady / 60}
            if shape in ("7b", "8b"):  # 70B estimated from this shape by weights per block
                row["projection_min"]["70b_est"] = 80 * steady * block_weights("70b") / block_weights(shape) / 60
            info["rows"].append(row)
            print(f"{shape} {tool}: block s {['%.2f' % s for s in row['block_s']]} tune s {['%.2f' % s for s in row['tune_s']]} "
                  f"peak GPU {row['peak_gpu_gb'] or float('nan'):.2f} GB host {row['peak_host_gb']:.2f} GB", flush=True)
            save()
    if result_file.exists():
        result_file.unlink()

    print(f"\n{info['device']}, W4A16 g128, {args.preset}, {args.iters} iters, {args.nsamples} x {args.seqlen}, batch {args.batch_size}")
    print(f"{'shape':6} {'tool':11} {'block0 s':>9} {'block1 s':>9} {'GPU GB':>7} {'host GB':>8} {'projection':>24}")
    for r in info["rows"]:
        if "error" in r:
            print(f"{r['shape']:6} {r['tool']:11} {r['error']}")
            continue
        proj = ", ".join(f"{k} {v:.1f} min" for k, v in r["projection_min"].items())
        b1 = r["block_s"][1] if len(r["block_s"]) > 1 else float("nan")
        print(f"{r['shape']:6} {r['tool']:11} {r['block_s'][0]:9.2f} {b1:9.2f} {r['peak_gpu_gb'] or float('nan'):7.2f} "
              f"{r['peak_host_gb']:8.2f} {proj:>24}")
    by = {(r["shape"], r["tool"]): r for r in info["rows"] if "error" not in r}
    for shape in args.shapes.split(","):
        if (shape, "ours") in by and (shape, "intel") in by:
            ratio = by[(shape, "ours")]["s_per_block"] / by[(shape, "intel")]["s_per_block"]
            info.setdefault("ratios", {})[shape] = ratio
            print(f"{shape}: ours / Intel seconds per block = {ratio:.3f}")
    save()


if __name__ == "__main__":
    main()
