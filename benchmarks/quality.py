"""Perplexity and wall time of this project's quantization on the reference model, per scheme and preset.

Settings follow ../shared/anchors/README.md: calibration 128 x 512 tokens from the training corpus
(seed 42), batch 8; evaluation on the first 300 non-overlapping 512-token windows of heldout.txt, the
file tokenized piece by piece (split on blank lines), bf16 compute on CUDA.

  python benchmarks/quality.py --schemes W4A16,W3A16,W2A16 --presets auto-round --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from quantize.calib import calibration_ids
from quantize.checkpoint import layout_for
from quantize.eval import load_eval_ids, perplexity
from quantize.layer_config import plan_layers
from quantize.model import compute_dtype, find_blocks, load_model
from quantize.presets import get_preset
from quantize.quantizer import quantize_model
from quantize.scheme import get_scheme

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
# Intel AutoRound 0.16.1 on an H200 (anchors/README.md): (scheme, preset) -> perplexity.
ANCHORS = {
    ("W4A16", "rtn"): 43.30, ("W4A16", "auto-round-light"): 42.37, ("W4A16", "auto-round"): 41.93,
    ("W4A16", "auto-round-best"): 42.12, ("W3A16", "auto-round"): 42.95, ("W2A16", "auto-round"): 58.45,
    ("W2A16G64", "auto-round"): 54.25,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/gutenberg-llama-29m"))
    p.add_argument("--calib", default=str(SHARED / "data/gutenberg/calib.txt"))
    p.add_argument("--heldout", default=str(SHARED / "data/gutenberg/heldout.txt"))
    p.add_argument("--schemes", default="W4A16,W3A16,W2A16")
    p.add_argument("--presets", default="auto-round")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=300)
    p.add_argument("--iters", type=int, default=None, help="override the presets' iters")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok = load_model(args.model)
    # .pt files hold ids prepared elsewhere (the GPU machine has no ../shared): same ids on every machine.
    eval_ids = torch.load(args.heldout) if args.heldout.endswith(".pt") else load_eval_ids(args.heldout, tok)
    calib = torch.load(args.calib) if args.calib.endswith(".pt") else calibration_ids(args.calib, tok, args.nsamples, args.seqlen, seed=42)
    dtype = compute_dtype(device, base.dtype)

    def ppl(model) -> float:
        model.to(device, dtype)
        value = perplexity(model, eval_ids, seqlen=512, max_windows=args.windows, progress=False)
        model.to("cpu", base.dtype)
        return value

    rows = [{"scheme": "BF16", "preset": "-", "ppl": ppl(base), "seconds": 0.0}]
    print(f"{'scheme':10} {'preset':18} {'ppl':>8} {'anchor':>8} {'ratio':>7} {'seconds':>8}")
    print(f"{'BF16':10} {'-':18} {rows[0]['ppl']:8.2f}")
    for scheme_name in args.schemes.split(","):
        for preset in args.presets.split(","):
            scheme = get_scheme(scheme_name)
            cfg = get_preset(preset, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8, iters=args.iters)
            model = copy.deepcopy(base)
            blocks = find_blocks(model)
            plan = plan_layers(model, blocks.prefix, scheme, layout_for=layout_for)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            quantize_model(model, blocks, plan, calib, cfg, device, progress=False)
            seconds = time.time() - t0
            value = ppl(model)
            anchor = ANCHORS.get((scheme_name, preset))
            ratio = f"{value / anchor:7.3f}" if anchor else " " * 7
            print(f"{scheme_name:10} {preset:18} {value:8.2f} {anchor or float('nan'):8.2f} {ratio} {seconds:8.1f}", flush=True)
            rows.append({"scheme": scheme_name, "preset": preset, "ppl": value, "anchor": anchor, "seconds": seconds})
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
