"""Decode speed of quantized checkpoints in SGLang on the GPU: bf16, SGLang's built-in auto-round path
(the plugin left out with ``SGLANG_PLUGINS=none``) and this project's plugin, on a Llama-2-7B-shaped model
with random weights. Runs on the GPU machine with the SGLang kit (e2e/README.md, "SGLang on the GPU
machine").

Writes the checkpoints with benchmarks/vllm_gpu.py's writer (bf16; W4/W3/W2A16 g128 sym in AutoRound's
``auto_round:auto_gptq`` layout, RTN, on the GPU), then serves each row in its own process (``sglang.Engine``,
Triton attention, CUDA graphs for decode up to the largest batch) and measures decode tokens/s at several
batch sizes (128-token prompts, ``--new-tokens`` new tokens, ignore_eos). Prints a table and writes JSON.

  python benchmarks/sglang_gpu.py --work /tmp/sb --tokenizer /tmp/sgdata/w4sym --json $OUT/sglang_bench.json
  (on the GPU machine: bash e2e/sglang_gpu_run.sh bench --deadline 330; again with the same --json to finish)

Seen on an H200 (2026-12-02; benchmarks/results/sglang_gpu_h200_7b.json): checkpoints written in 33 s, each
row 75-125 s (process start and SGLang's imports about 30 s, CUDA graph capture, the measurement), so the
eight rows take two 600 s calls. "W4A16 plugin" computes with SGLang's own Marlin (integrations/sglang/
marlin.py), the kernel of the built-in path: the two measured the same (335 vs 338 tokens/s at batch 1,
1.52x bf16). SGLang 0.5.17's built-in path still has a non-Marlin GPTQ fallback (sgl_kernel.gptq_gemm) for
2/3-bit and asymmetric GPTQ-packed layers (read from its source; its rows were not reached in the run above);
0.5.20+ removed it (issue 16), which is where W2/W3 need the plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))

# row name -> (checkpoint, plugin on)
ROWS = {
    "bf16": ("bf16", True),
    "W4A16 SGLang built-in": ("W4A16", False),
    "W4A16 plugin": ("W4A16", True),
    "W4A16 plugin (Triton)": ("W4A16-triton", True),
    "W3A16 plugin": ("W3A16", True),
    "W2A16 plugin": ("W2A16", True),
    "W3A16 SGLang built-in": ("W3A16", False),
    "W2A16 SGLang built-in": ("W2A16", False),
}


def measure(ckpt: Path, batches: list[int], prompt_len: int, new_tokens: int) -> dict:
    """One engine: decode tokens/s per batch size."""
    import sglang

    engine = sglang.Engine(model_path=str(ckpt), attention_backend="triton", sampling_backend="pytorch",
                           mem_fraction_static=0.6, context_length=prompt_len + new_tokens + 64,
                           max_running_requests=max(batches), cuda_graph_max_bs_decode=max(batches),
                           disable_prefill_cuda_graph=True, random_seed=0, log_level="info")
    try:
        prompt = [(7 * i) % 8000 + 10 for i in range(prompt_len)]
        engine.generate(input_ids=[prompt] * max(batches), sampling_params={"max_new_tokens": 16, "ignore_eos": True})  # warm-up
        result = {"tok_s": {}}
        for b in batches:
            # Distinct prompts per row of the batch (the first token differs), so no request shares another's cache.
            ids = [[(j * 13) % 8000 + 10] + prompt[1:] for j in range(b)]
            t0 = time.perf_counter()
            outs = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
            dt = time.perf_counter() - t0
            result["tok_s"][str(b)] = sum(o["meta_info"]["completion_tokens"] for o in outs) / dt
        return result
    finally:
        engine.shutdown()


def run_row(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """One engine in its own process group (a timeout kills all of it, leaving the GPU free for the next row)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return subprocess.CompletedProcess(cmd, -1, stdout, stderr + f"\ntimed out after {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/sglang-bench")
    p.add_argument("--tokenizer", required=True, help="folder with a tokenizer of vocabulary 8192 (e.g. a checkpoint of the reference model)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--row-timeout", type=int, default=240, help="seconds one engine may take, start to finish")
    p.add_argument("--deadline", type=float, default=None,
                   help="start no engine after this many seconds; rows already in --json are kept and not rerun")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = p.parse_args()
    work = Path(args.work)
    batches = [int(b) for b in args.batches.split(",")]

    if args.row:
        ckpt, _ = ROWS[args.row]
        print(json.dumps(measure(work / ckpt, batches, args.prompt_len, args.new_tokens)))
        return

    import torch

    from vllm_gpu import FORCED, SCHEMES, build_checkpoints

    needed = list(SCHEMES)
    if not all((work / n / "config.json").exists() for n in ["bf16", *needed, *(f"W4A16-{k}" for k in FORCED)]):
        t0 = time.time()
        build_checkpoints(work, Path(args.tokenizer), args.layers, needed)
        torch.cuda.empty_cache()
        print(f"checkpoints written in {time.time() - t0:.0f} s", flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
            "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "rows": {}}
    if args.json and Path(args.json).exists():
        info = json.loads(Path(args.json).read_text())
        info["rows"] = {k: v for k, v in info["rows"].items() if "error" not in v or "refused" in v}
    import sglang

    info["sglang"] = sglang.__version__
    for row in [r for r in args.rows.split(",") if r]:
        if row in info["rows"]:
            continue
        if args.deadline is not None and time.time() - START > args.deadline:
            print(f"deadline: {row} not started", flush=True)
            continue
        _, plugin = ROWS[row]
        env = {**os.environ, "SGLANG_PLUGINS": os.environ.get("SGLANG_PLUGINS", "") if plugin else "none"}
        if plugin and not env["SGLANG_PLUGINS"]:
            del env["SGLANG_PLUGINS"]
        cmd = [sys.executable, __file__, "--row", row, "--work", str(work), "--batches", args.batches,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--tokenizer", args.tokenizer]
        t0 = time.time()
        out = run_row(cmd, env, args.row_timeout)
        log = (out.stdout + out.stderr).splitlines()
        kernels = sorted({ln.split("quantize-llm:", 1)[1].strip().split(" computes with ")[-1] for ln in log if "quantize-llm:" in ln})
        methods = sorted({m for ln in log for m in re.findall(r"\b(\w*Marlin\w*|\w*Gptq\w*Method|\w*GPTQ\w*Method)\b", ln)})[:6]
        if out.returncode:
            errs = [ln for ln in log if "Error" in ln or "error" in ln]
            info["rows"][row] = {"error": "\n".join((errs[-5:] or log[-20:])), "seconds": time.time() - t0}
        else:
            info["rows"][row] = {**json.loads(out.stdout.strip().splitlines()[-1]), "kernels": kernels, "methods_in_log": methods,
                                 "seconds": time.time() - t0}
        print(row, json.dumps(info["rows"][row])[:500], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))
    base = info["rows"].get("bf16", {}).get("tok_s", {})
    builtin = info["rows"].get("W4A16 SGLang built-in", {}).get("tok_s", {})
    print(f"\n{info['device']}, SGLang {info.get('sglang')}, {args.layers} layers of Llama-2-7B shape, decode tokens/s "
          f"({args.prompt_len}-token prompts, {args.new_tokens} new tokens); (x bf16)")
    print(f"{'row':26}" + "".join(f"{'b=' + str(b):>18}" for b in batches))
    for row, r in info["rows"].items():
        if "error" in r:
            print(f"{row:26}refused/failed: {r['error'].splitlines()[-1][:150] if r['error'] else ''}")
            continue
        cells = "".join(f"{r['tok_s'][str(b)]:10.0f} ({r['tok_s'][str(b)] / base[str(b)]:.2f}x)" if str(b) in base else f"{r['tok_s'][str(b)]:18.0f}"
                        for b in batches)
        print(f"{row:26}{cells}")
    if builtin and "W4A16 plugin" in info["rows"] and "tok_s" in info["rows"]["W4A16 plugin"]:
        ours = info["rows"]["W4A16 plugin"]["tok_s"]
        print("W4A16 plugin / SGLang built-in: " + ", ".join(f"b={b}: {ours[str(b)] / builtin[str(b)]:.2f}x" for b in batches))


if __name__ == "__main__":
    main()
