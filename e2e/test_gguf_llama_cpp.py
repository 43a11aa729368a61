"""GGUF exports run in llama.cpp itself: the reference Llama (../shared/models/gutenberg-llama-29m),
RTN-quantized by this project, converted to GGUF (Q4_0, Q4_1, Q8_0, Q4_K_S/M, Q2_K), loaded and run by
llama.cpp's CPU build from the ``llama-cpp-cffi`` wheel, called through llama.cpp's C API (model load,
tokenizer, one batch decode with logits at every position). Its logits must match our dequantized model
(the ``fake`` export in transformers, float32) within stated tolerances, and its tokenizer (from the
GGUF metadata) must give our token ids.

Stated tolerances, measured on 128 held-out tokens (2 CPU threads): llama.cpp quantizes activations to
8 bits for its dot products, which alone moves the logits by about 2% of their spread (RMS), so formats
that hold our weights exactly (Q4_0, Q8_0; Q4_1 to its float16 minimum) measure 0.020 and mean NLL within
0.25%; the K-quants store scales on their own grids, 0.048-0.055 and 0.1-0.5%; Q2_K (4-bit scales and
mins per 16 weights) 0.136 and 1.2%, against 2-bit quantization's own movement of the logits, several
times larger (checked at 2 and 4 bits).

The wheel's ``_llama_cpp_cpu`` module is loaded on its own (its package ``__init__`` imports a server
stack this test does not need). It was linked against GCC 14's C++ runtime and references one symbol
older runtimes lack (``__cxa_call_terminate``, called only when an exception escapes a ``noexcept``
function); where the system's libstdc++ lacks it, a two-line definition is compiled and loaded first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantize.cli import main as quantize_main
from quantize.convert import convert

from conftest import shared_path
TOKENS = 128

SHIM = """
#include <exception>
extern "C" void* __cxa_begin_catch(void*) noexcept;
extern "C" [[noreturn]] void __cxa_call_terminate(void* e) noexcept { if (e) __cxa_begin_catch(e); std::terminate(); }
"""

# (checkpoint, GGUF preset, max RMS logit error over the logits' spread, max relative NLL change, min top-1 agreement)
CASES = [
    ("w4g32sym", "q4_0", 0.03, 0.005, 0.97),
    ("w4g32sym", "q4_k_m", 0.08, 0.01, 0.95),
    ("w4g32asym", "q4_1", 0.03, 0.005, 0.97),
    ("w4g32asym", "q4_k_s", 0.08, 0.01, 0.93),
    ("w8g32sym", "q8_0", 0.03, 0.005, 0.97),
    ("w2g32asym", "q2_k", 0.2, 0.025, 0.75),
]
SCHEMES = {
    "w4g32sym": ["--scheme", "W4A16", "--group_size", "32"],
    "w4g32asym": ["--scheme", "W4A16", "--group_size", "32", "--asym"],
    "w8g32sym": ["--scheme", "W8A16", "--group_size", "32"],
    "w2g32asym": ["--scheme", "W2A16", "--group_size", "32", "--asym"],
}


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """llama.cpp's C API (cffi ``lib`` and ``ffi``), backend initialised."""
    spec = importlib.util.find_spec("llama")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-cffi is not installed (pip install --no-deps llama-cpp-cffi==0.4.42)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("_llama_cpp_cpu*.so"))
    if not found:
        pytest.skip("the installed llama package has no llama.cpp CPU module (is it llama-cpp-cffi?)")
    try:
        module = _load_module(str(found[0]))
    except ImportError as e:
        if "__cxa_call_terminate" not in str(e):
            raise
        if shutil.which("g++") is None:
            pytest.skip("llama.cpp's module needs __cxa_call_terminate (GCC 14 runtime) and no g++ is here to define it")
        work = tmp_path_factory.mktemp("shim")
        (work / "shim.cc").write_text(SHIM)
        subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-o", str(work / "libshim.so"), str(work / "shim.cc")], check=True)
        ctypes.CDLL(str(work / "libshim.so"), mode=ctypes.RTLD_GLOBAL)
        module = _load_module(str(found[0]))
    module.lib.llama_backend_init()
    return module.lib, module.ffi


def llama_cpp_run(llama, gguf: Path, text: str, n: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's tokens for ``text`` (first ``n``) and its logits ``[n, vocab]`` at every position."""
    lib, ffi = llama
    model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
    assert model != ffi.NULL, f"llama.cpp could not load {gguf}"
    vocab = lib.llama_model_get_vocab(model)
    raw = text.encode()
    buf = ffi.new("llama_token[]", len(raw) + 8)
    count = lib.llama_tokenize(vocab, raw, len(raw), buf, len(raw) + 8, True, False)
    assert count >= n, count
    ids = [buf[i] for i in range(n)]
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n + 8, n, n
    params.n_threads = params.n_threads_batch = 2
    ctx = lib.llama_init_from_model(model, params)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        assert lib.llama_decode(ctx, batch) == 0
        nv = lib.llama_vocab_n_tokens(vocab)
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits(ctx), n * nv * 4), dtype=np.float32).reshape(n, nv)
        return ids, torch.from_numpy(logits.copy())
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)


@pytest.fixture(scope="module")
def work(tmp_path_factory, gutenberg):
    root = tmp_path_factory.mktemp("llama_cpp")
    text = shared_path("data/gutenberg/heldout.txt").read_text()[:4000]
    ids = AutoTokenizer.from_pretrained(gutenberg)(text).input_ids[:TOKENS]
    full = AutoModelForCausalLM.from_pretrained(gutenberg, dtype=torch.float32)
    with torch.no_grad():
        unquantized = full(torch.tensor([ids])).logits[0]
    return {"root": root, "text": text, "ids": ids, "unquantized": unquantized, "ckpts": {}}


def _checkpoint(work, gutenberg, name: str) -> Path:
    if name not in work["ckpts"]:
        out = work["root"] / name
        quantize_main([str(gutenberg), *SCHEMES[name], "--iters", "0", "--output_dir", str(out), "--quiet", "--no-eval"])
        (fake,) = convert(out, "fake", work["root"] / f"{name}-fake")
        model = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32)
        with torch.no_grad():
            work["ckpts"][name] = (out, model(torch.tensor([work["ids"]])).logits[0])
    return work["ckpts"][name]


def _nll(logits: torch.Tensor, ids: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


@pytest.mark.parametrize("name, preset, rms_tol, nll_tol, top1_min", CASES)
def test_llama_cpp_runs_our_gguf(name, preset, rms_tol, nll_tol, top1_min, llama, work, gutenberg):
    ckpt, want = _checkpoint(work, gutenberg, name)
    (out,) = convert(ckpt, f"gguf:{preset}", work["root"] / f"{name}-{preset}")
    ids, got = llama_cpp_run(llama, next(out.glob("*.gguf")), work["text"], TOKENS)
    assert ids == work["ids"], "llama.cpp's tokenizer (from the GGUF metadata) disagrees with ours"
    rms = lambda x: x.pow(2).mean().sqrt().item()
    spread = rms(want - want.mean(-1, keepdim=True))
    err = rms(got - want) / spread
    nll_ours, nll_llama = _nll(want, ids), _nll(got, ids)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert err <= rms_tol, (preset, err)
    assert abs(nll_llama - nll_ours) <= nll_tol * nll_ours, (preset, nll_ours, nll_llama)
    assert top1 >= top1_min, (preset, top1)
    if not name.startswith("w8"):  # at 2-4 bits: what llama.cpp changes is a fraction of what quantizing changed
        assert rms(got - want) <= 0.5 * rms(work["unquantized"] - want), preset


def test_llama_cpp_splits_digits_as_the_tokenizer_does(llama, gutenberg, tmp_path):
    """A tokenizer that splits digits one by one before GPT-2's regex (SmolLM's) is written with
    llama.cpp's "smollm" split: llama.cpp then cuts numbers into the same tokens as transformers."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gutenberg)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    quantize_main([str(tmp_path / "tiny"), "--scheme", "W4A16", "--group_size", "32", "--iters", "0",
                   "--output_dir", str(tmp_path / "q"), "--quiet", "--no-eval"])
    (out,) = convert(tmp_path / "q", "gguf:q4_0", tmp_path / "g")
    text = "In 1859, 42 ships and 1000000 men sailed 3.14 leagues in 2024."
    want = AutoTokenizer.from_pretrained(tmp_path / "q")(text).input_ids
    assert len([t for t in want if tok.convert_ids_to_tokens(t).strip("Ġ").isdigit()]) >= 15  # one token per digit
    got, _ = llama_cpp_run(llama, next(out.glob("*.gguf")), text, len(want))
    assert got == want
