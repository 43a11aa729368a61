"""Decode speed on the CPU in transformers: the unquantized model against its quantized
checkpoints, each loaded with ``from_pretrained(path)`` defaults (``--dtype float32``: all in float32), on
the kernel the dispatch picks and on the portable path (kernel forced to ``torch``), in one process, rows
interleaved over the repeats.

Writes the checkpoints with ``python -m quantize MODEL --scheme S --iters 0`` (the kernels do not care how
the codes were tuned), then times greedy generation (batch 1) and prints tokens/s and the ratio to the unquantized model.

  python benchmarks/cpu_decode.py --model ../shared/models/gutenberg-llama-29m --work /tmp/cpu-decode --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = "It was a bright cold day in April, and the clocks were striking thirteen. The old man"


def make_checkpoint(model: str, scheme: str, work: Path, kernel: str | None) -> Path:
    out = work / scheme
    if not out.exists():
        subprocess.run([sys.executable, "-m", "quantize", model, "--scheme", scheme, "--iters", "0", "--no-eval", "--quiet",
                        "--output_dir", str(out)], check=True, cwd=REPO)
    if kernel is None:
        return out
    forced = work / f"{scheme}-{kernel}"
    if not forced.exists():
        shutil.copytree(out, forced)
        cfg = json.loads((forced / "config.json").read_text())
        cfg["quantization_config"]["kernel"] = kernel
        (forced / "config.json").write_text(json.dumps(cfg, indent=1))
    return forced


def tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    import quantize  # noqa: F401  (the transformers integration; also registered by quantize-llm.pth)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--schemes", default="W4A16,W3A16,W2A16G64")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="every row's compute dtype (auto: from_pretrained's default, the checkpoint's bf16); float32 on "
                        "CPUs without bf16 instructions (AVX2-only), where bf16 products run ~70x slower")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    rows = {"unquantized": Path(args.model)}
    for scheme in args.schemes.split(","):
        rows[f"{scheme} (default kernel)"] = make_checkpoint(args.model, scheme, work, None)
        rows[f"{scheme} (portable: torch)"] = make_checkpoint(args.model, scheme, work, "torch")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    models, kernels = {}, {}
    for name, path in rows.items():
        models[name] = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype).eval()
        picked = {m.kernel.name for m in models[name].modules() if type(m).__name__ == "QuantLinear" and m.kernel}
        kernels[name] = ",".join(sorted(picked)) or "F.linear"
        tokens_per_second(models[name], ids, 8)  # warm-up
    speeds = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, model in models.items():
            speeds[name].append(tokens_per_second(model, ids, args.new_tokens))
    base = statistics.median(speeds["unquantized"])
    print(f"{'row':32} {'kernel':14} {'tok/s':>8} {'vs unquantized':>15}")
    results = []
    for name in rows:
        med = statistics.median(speeds[name])
        results.append({"row": name, "kernel": kernels[name], "tokens_per_s": med, "ratio": med / base, "runs": speeds[name]})
        print(f"{name:32} {kernels[name]:14} {med:8.1f} {med / base:7.2f}x")
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model, "new_tokens": args.new_tokens,
            "dtype": str(next(models["unquantized"].parameters()).dtype), "rows": results}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
