"""Perplexity and wall time of this project and Intel AutoRound, side by side, per scheme and preset.

Settings follow ../shared/anchors/README.md: calibration 128 x 512 tokens from the training corpus
(seed 42), batch 8; evaluation on the first 300 non-overlapping 512-token windows of heldout.txt, the
file tokenized piece by piece (split on blank lines), bf16 compute on CUDA. Both tools get the same
calibration token ids (Intel's AutoRound takes them as a list of [1, seqlen] tensors) and are evaluated on
the same ids with the same perplexity function. Seconds: wall time of the tuning call alone
(``quantize_model`` here, ``AutoRound(...).quantize()`` for Intel, compile warm-up included, model loading
not), GPU synchronized before and after.

  python benchmarks/quality.py --schemes W4A16,W3A16,W2A16,W2A16G64 --presets auto-round --json out.json
  python benchmarks/quality.py --configs W4A16:auto-round-light,W2A16:auto-round --tools ours,intel
  python benchmarks/quality.py --model .gpu/model --calib .gpu/calib128x512.pt --heldout .gpu/heldout300.pt
  python benchmarks/quality.py --configs auto@3.0:auto-round,W2A16:auto-round --auto-options W2A16,W4A16,W8A16
  python benchmarks/quality.py --configs auto@4.5:auto-round --seeds 42,43,44     # rows within one seed's spread

``auto@BITS``: AutoScheme over ``--auto-options`` for at most BITS bits per weight (ours and Intel's), each
row with the average bits it counts (block layers, 16-bit scales, zero points of asym schemes).

Intel's AutoRound (``pip install auto-round==0.16.1``) runs in this process; without it only ours runs.
Rows are printed and the JSON rewritten as each finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
# Intel AutoRound 0.16.1 on an H200 (anchors/README.md): (scheme, preset) -> perplexity.
ANCHORS = {
    ("W4A16", "rtn"): 43.30, ("W4A16", "auto-round-light"): 42.37, ("W4A16", "auto-round"): 41.93,
    ("W4A16", "auto-round-best"): 42.12, ("W3A16", "auto-round"): 42.95, ("W2A16", "auto-round"): 58.45,
    ("W2A16G64", "auto-round"): 54.25,
}


# Our tool's variants for side-by-side checks of one setting: TuneConfig fields over the preset's.
OURS_VARIANTS = {"ours": {}, "ours-fp8": {"fp8_grads": True}, "ours-clip": {"init_clip": True}, "ours-noclip": {"init_clip": False},
                 "ours-fp32": {"amp": False}, "ours-bf16": {"amp": True}}
# AutoRound's variants: at iters 0, "intel" is its plain RTN (disable_opt_rtn), "intel-optrtn" its default
# "optimized RTN" (imatrix-weighted scale search), against which "ours-clip" (--init-clip) compares.
# "intel-fp32": AutoRound with amp off (float32 compute); on a CPU it computes in bf16 by default where the
# CPU has AVX512_BF16 and in float32 elsewhere, so on an AVX2-only CPU this is its default.
INTEL_VARIANTS = {"intel": {}, "intel-optrtn": {"opt_rtn": True}, "intel-fp32": {"amp": False}}


def intel_settings(cfg) -> dict:
    """AutoRound keyword arguments for one of our presets (same iters, lr, samples, length, batch)."""
    kw = dict(iters=cfg.iters, nsamples=cfg.nsamples, seqlen=cfg.seqlen, batch_size=cfg.batch_size, seed=cfg.seed)
    if cfg.lr is not None:
        kw["lr"] = cfg.lr
    if cfg.minmax_lr is not None:
        kw["minmax_lr"] = cfg.minmax_lr
    return kw


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def auto_target(scheme_name: str) -> float | None:
    """``auto@3.0`` (AutoScheme for an average of 3.0 bits over --auto-options) -> 3.0; None otherwise."""
    return float(scheme_name.split("@", 1)[1]) if scheme_name.startswith("auto@") else None


def counted_bits(model, scheme) -> float:
    """Average bits per weight of the block layers under one uniform scheme, counted as AutoScheme counts
    them (quantize.autoscheme)."""
    from quantize.autoscheme import average_bits
    from quantize.model import find_blocks

    blocks = find_blocks(model)
    shapes = {f"{blocks.prefix}.{i}.{n}": (m.out_features, m.in_features) for i, b in enumerate(blocks.modules)
              for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    return average_bits(shapes, dict.fromkeys(shapes, scheme))


def mean_row(rows: list[dict]) -> dict:
    """One tool's rows of a config (one per seed) as one: mean perplexity and seconds."""
    return {"tool": rows[0]["tool"], "ppl": sum(r["ppl"] for r in rows) / len(rows), "seconds": sum(r["seconds"] for r in rows) / len(rows)}


def run_ours(base, scheme, cfg, calib, device, auto=None):
    """``auto``: (options, target bits): AutoScheme picks each layer's scheme first (scored on 16 x 256
    calibration tokens, as AutoRound scores; its time counts), then tuning as usual."""
    from quantize.autoscheme import choose_schemes
    from quantize.checkpoint import layout_for
    from quantize.layer_config import plan_layers
    from quantize.model import find_blocks
    from quantize.quantizer import quantize_model

    model = copy.deepcopy(base)
    blocks = find_blocks(model)
    sync(device)
    t0 = time.time()
    layer_config, bits = None, None
    if auto is not None:
        plan = choose_schemes(model, blocks, auto[0], auto[1], calib[:16, :256], layout_for=layout_for, device=device, progress=False)
        layer_config, scheme, bits = plan.layer_config, plan.base_scheme, plan.average
    plan = plan_layers(model, blocks.prefix, scheme, layer_config, layout_for=layout_for)
    quantize_model(model, blocks, plan, calib, cfg, device, progress=False)
    sync(device)
    return model, time.time() - t0, bits if bits is not None else counted_bits(model, scheme)


def run_intel(base, tok, scheme, cfg, calib, device, opt_rtn: bool = False, auto=None, **extra):
    from auto_round import AutoRound

    model = copy.deepcopy(base)
    if auto is not None:
        import tempfile

        from auto_round import AutoScheme

        # With AutoScheme on, AutoRound takes a dataset name or a local .jsonl of texts only (its scoring reads
        # the run's dataset): the calibration rows decoded, which its loader re-tokenizes, so these rows
        # calibrate on the same texts, not exactly the same ids.
        texts = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
        for row in calib:
            texts.write(json.dumps({"text": tok.decode(row)}) + "\n")
        texts.close()
        how = dict(scheme=AutoScheme(avg_bits=auto[1], options=tuple(auto[0]), nsamples=16, seqlen=256), dataset=texts.name)
    else:
        # FP and activation-quantized schemes by AutoRound's preset name (our names are its names); at iters 0
        # its plain RTN (disable_opt_rtn), which is what ours computes at iters 0 by default, unless opt_rtn
        # asks for its "optimized RTN" scale search (minutes per block on a CPU).
        how = (dict(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym) if scheme.integer_weight_only
               else dict(scheme=scheme.name))
        if how.get("scheme", "").endswith("FP4A16"):  # AutoRound names these NVFP4 / MXFP4 with 16-bit activations
            how.update(scheme=how["scheme"][: -len("A16")], act_bits=16)
        how.update(disable_opt_rtn=cfg.iters == 0 and not opt_rtn, dataset=[row.unsqueeze(0) for row in calib])
    ar = AutoRound(model, tokenizer=tok, **how, device_map=0 if device.type == "cuda" else "cpu",
                   disable_model_free=True, **intel_settings(cfg), **extra)
    sync(device)
    t0 = time.time()
    ar.quantize()  # leaves the quantize-dequantized weights in the model's layers
    sync(device)
    seconds = time.time() - t0
    model = ar.model
    del ar
    # its AutoScheme's plan stays inside it: the average it counted is in its log
    return model, seconds, None if auto is not None else counted_bits(model, scheme)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/gutenberg-llama-29m"))
    p.add_argument("--calib", default=str(SHARED / "data/gutenberg/calib.txt"), help="text, or a .pt of ids [n, seqlen]")
    p.add_argument("--heldout", default=str(SHARED / "data/gutenberg/heldout.txt"), help="text, or a .pt of flat ids")
    p.add_argument("--schemes", default="W4A16,W3A16,W2A16,W2A16G64")
    p.add_argument("--presets", default="auto-round,auto-round-light,auto-round-best")
    p.add_argument("--configs", default=None, help="explicit SCHEME:PRESET[:TOOL] list, in this order (overrides --schemes/--presets)")
    p.add_argument("--tools", default="ours,intel", help="ours, intel or both (intel skipped if auto_round is missing); "
                   "intel-fp32: Intel with amp off (float32); ours-fp8: ours with float8 backward products (--fp8-grads); ours-clip / ours-noclip: with / without the "
                   "clipping search before tuning (at --iters 0: the searched rounding); intel-optrtn: AutoRound's optimized RTN at iters 0; ours-fp32 / ours-bf16: bf16 autocast off / on (default: by device)")
    p.add_argument("--auto-options", default="W2A16,W4A16,W8A16", help="AutoScheme's options for configs named auto@BITS "
                   "(e.g. --configs auto@3.0:auto-round,W2A16:auto-round: the mix at 3.0 bits beside uniform W2A16)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=None, help="override the presets' iters (smoke tests)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="our compiled qdq (auto: by block size)")
    p.add_argument("--deadline", type=float, default=None, help="seconds: start no new tuning run after this")
    p.add_argument("--skip-bf16", action="store_true", help="do not evaluate the unquantized model")
    p.add_argument("--seeds", default="42", help="tuning seeds (e.g. 42,43,44): each row runs once per seed, and the "
                   "side-by-side summary compares the tools' mean perplexity and time (where one run's spread decides a row)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from quantize.calib import calibration_ids
    from quantize.eval import load_eval_ids, perplexity
    from quantize.model import compute_dtype, load_model
    from quantize.presets import get_preset
    from quantize.scheme import get_scheme

    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok = load_model(args.model)
    # .pt files hold ids prepared elsewhere (the GPU machine has no ../shared): same ids on every machine.
    eval_ids = torch.load(args.heldout) if args.heldout.endswith(".pt") else load_eval_ids(args.heldout, tok)
    calib = torch.load(args.calib) if args.calib.endswith(".pt") else calibration_ids(args.calib, tok, args.nsamples, args.seqlen, seed=42)
    calib = calib[: args.nsamples, : args.seqlen]
    dtype = compute_dtype(device, base.dtype)
    tools = [t for t in args.tools.split(",") if t]
    versions = {"torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    if any(t in INTEL_VARIANTS for t in tools):
        try:
            import auto_round

            versions["auto_round"] = auto_round.__version__
        except Exception as e:  # noqa: BLE001 - report and go on with ours
            print(f"auto_round unavailable ({type(e).__name__}: {e}); running ours only", flush=True)
            tools = [t for t in tools if t not in INTEL_VARIANTS]
    if args.configs:
        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    else:
        configs = [(s, pr) for s in args.schemes.split(",") for pr in args.presets.split(",")]
    configs = [c if len(c) == 3 else (*c, None) for c in configs]
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]

    def ppl(model) -> float:
        model.to(device, dtype)
        value = perplexity(model, eval_ids, seqlen=512, max_windows=args.windows, progress=False)
        model.to("cpu", base.dtype)
        return value

    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions, "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
        "eval_tokens": int(min(len(eval_ids) // 512, args.windows) * 512), "rows": [], "summary": [],
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))

    if not args.skip_bf16:
        info["bf16_ppl"] = ppl(base)
        print(f"BF16 ppl {info['bf16_ppl']:.2f}", flush=True)
    print(f"{'scheme':9} {'preset':17} {'tool':10} {'ppl':>8} {'anchor':>7} {'seconds':>8} {'GPU GB':>7} {'bits':>6}", flush=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    for scheme_name, preset, only in configs:
        results: dict[str, list[dict]] = {}
        for tool, seed in [(t, sd) for t in tools for sd in seeds]:
            if only and tool != only:
                continue
            if args.deadline is not None and time.time() - start > args.deadline:
                print(f"deadline reached: skipping {scheme_name} {preset} {tool}", flush=True)
                info.setdefault("skipped", []).append(f"{scheme_name}:{preset}:{tool}")
                continue
            target = auto_target(scheme_name)
            auto = (args.auto_options.split(","), target) if target is not None else None
            scheme = get_scheme("W4A16" if auto else scheme_name)
            over = dict(nsamples=int(calib.shape[0]), seqlen=int(calib.shape[1]), batch_size=args.batch_size, iters=args.iters)
            cfg = get_preset(preset, **over, compile=compile_flag, seed=seed)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                if tool.startswith("ours"):
                    model, seconds, bits = run_ours(base, scheme, replace(cfg, **OURS_VARIANTS[tool]), calib, device, auto)
                else:
                    model, seconds, bits = run_intel(base, tok, scheme, cfg, calib, device, **INTEL_VARIANTS[tool], auto=auto)
                peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
                value = ppl(model)
            except Exception as e:  # noqa: BLE001 - keep the other rows
                import traceback

                traceback.print_exc()
                info["rows"].append({"scheme": scheme_name, "preset": preset, "tool": tool, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                save()
                continue
            del model
            gc.collect()
            anchor = ANCHORS.get((scheme_name, preset)) if tool == "intel" else None
            row = {"scheme": scheme_name, "preset": preset, "tool": tool, "ppl": value, "seconds": seconds,
                   "peak_gpu_gb": peak, "iters": cfg.iters, "anchor_h200": anchor, "bits": bits, "seed": seed}
            results.setdefault(tool, []).append(row)
            info["rows"].append(row)
            print(f"{scheme_name:9} {preset:17} {tool:10} {value:8.2f} {anchor or float('nan'):7.2f} {seconds:8.1f} "
                  f"{peak or float('nan'):7.2f} {bits or float('nan'):6.3f}" + (f"  seed {seed}" if len(seeds) > 1 else ""), flush=True)
            save()
        # the first of our variants beside the first of Intel's, in --tools order
        ours = next((results[t] for t in tools if t.startswith("ours") and t in results), None)
        intel = next((results[t] for t in tools if t in INTEL_VARIANTS and t in results), None)
        if ours and intel:
            o, i = mean_row(ours), mean_row(intel)
            s = {"scheme": scheme_name, "preset": preset, "tools": [o["tool"], i["tool"]], "ppl_ours": o["ppl"], "ppl_intel": i["ppl"],
                 "ppl_ratio": o["ppl"] / i["ppl"], "seconds_ours": o["seconds"], "seconds_intel": i["seconds"],
                 "time_ratio": o["seconds"] / i["seconds"]}
            if len(seeds) > 1:  # means over the seeds; each run's perplexity beside them
                s.update(runs=len(ours), ppl_ours_runs=[r["ppl"] for r in ours], ppl_intel_runs=[r["ppl"] for r in intel])
            info["summary"].append(s)
            save()

    if info["summary"]:
        print("\nside by side (ratio = ours / Intel)")
        print(f"{'scheme':9} {'preset':17} {'ppl ours':>9} {'ppl Intel':>9} {'ratio':>6} {'s ours':>7} {'s Intel':>7} {'ratio':>6}")
        for s in info["summary"]:
            print(f"{s['scheme']:9} {s['preset']:17} {s['ppl_ours']:9.2f} {s['ppl_intel']:9.2f} {s['ppl_ratio']:6.3f} "
                  f"{s['seconds_ours']:7.1f} {s['seconds_intel']:7.1f} {s['time_ratio']:6.3f}")
            if "runs" in s:
                print(f"{'':27} runs: ours {', '.join(f'{v:.2f}' for v in s['ppl_ours_runs'])}; "
                      f"Intel {', '.join(f'{v:.2f}' for v in s['ppl_intel_runs'])}")
        mean = sum(s["ppl_ratio"] for s in info["summary"]) / len(info["summary"])
        info["mean_ppl_ratio"] = mean
        print(f"mean ppl ratio {mean:.4f}")
    save()


if __name__ == "__main__":
    main()
