"""GGUF files for llama.cpp, written with the ``gguf`` library: llama-architecture metadata, the BPE
tokenizer, and every quantized layer's codes in the ggml block type that llama.cpp's mix gives it.

The rounding is ours: codes are copied, never re-rounded (see gguf_blocks for what each type keeps
exactly and where our scales are rounded to a K-quant's 4-, 6- or 8-bit grid). Tensors we did not quantize
(embeddings, norms, a 16-bit lm_head, layers kept 16-bit) stay in the model's dtype. A layer whose codes
do not fit the type its preset picks is refused with the layer, the type and the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from quantize.export.gguf_blocks import BlockError, encode
from quantize.export.registry import ExportError, exporter
from quantize.export.source import ExportSource
from quantize.requires import GGUF

# preset -> (base type, llama.cpp file type name); the per-tensor mix is tensor_type's
PRESETS = {
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
    "q3_k_s": ("Q3_K", "MOSTLY_Q3_K_S"),
    "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
    "q3_k_l": ("Q3_K", "MOSTLY_Q3_K_L"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}
ARCHITECTURES = ("llama", "mistral")
_FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last eighth, and
    every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(preset: str, name: str, layer: int | None, n_layers: int, gqa: int = 1) -> str:
    """The ggml type llama.cpp's quantizer gives a block linear layer (llama_tensor_get_type_impl in
    src/llama-quant.cpp, for the presets here and a dense llama model): attn_v (v_proj), ffn_down
    (down_proj) and attn_output (o_proj) get more bits in some mixes. ``gqa``: attention heads per
    key/value head (llama.cpp's n_gqa). Not followed: llama.cpp's 70B-only bump of attn_v to Q5_K, and its
    output.weight rule (we keep lm_head 16-bit, or in the base type where it was quantized)."""
    base = PRESETS[preset][0]
    if layer is None:
        return base
    v, down, out = (name.endswith(s) for s in ("v_proj", "down_proj", "o_proj"))
    more = _use_more_bits(layer, n_layers)
    if preset == "q2_k":
        if v:
            return "Q4_K" if gqa >= 4 else "Q3_K"
        return "Q3_K" if down or out else base
    if preset == "q3_k_m":
        if v:
            return "Q5_K" if layer < 2 else "Q4_K"
        if down:
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        return "Q4_K" if out else base
    if preset == "q3_k_l":
        return "Q5_K" if v or down or out else base
    if preset == "q4_k_s":
        return "Q5_K" if (v and layer < 4) or (down and layer < n_layers // 8) else base
    if preset in ("q4_k_m", "q5_k_m"):
        return "Q6_K" if (v or down) and more else base
    return base


def _layer_index(source: ExportSource, name: str) -> int | None:
    for prefix in source.block_prefixes:
        if name.startswith(prefix + "."):
            return int(name[len(prefix) + 1 :].split(".")[0])
    return None


def _rope_rows(name: str, rows: int, config) -> torch.Tensor | None:
    """llama.cpp stores q/k rows in Meta's rotary order (interleaved pairs), not transformers' halves:
    the same row permutation its converter applies to the weights (codes, scales and zeros move with
    their row)."""
    heads = config.num_attention_heads
    if name.endswith("k_proj"):
        heads = getattr(config, "num_key_value_heads", None) or heads
    elif not name.endswith("q_proj"):
        return None
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _float_tensor(t: torch.Tensor) -> tuple[np.ndarray, str]:
    kind = "F32" if t.ndim == 1 else _FLOAT_TYPES.get(t.dtype, "F32")
    if kind == "BF16":
        return t.contiguous().view(torch.int16).numpy().view(np.uint8), kind
    return t.to(torch.float32 if kind == "F32" else t.dtype).numpy(), kind


def _metadata(writer, source: ExportSource, file_type: str) -> None:
    import gguf

    c = source.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    writer.add_name(source.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _byte_level_regex(p: dict | None) -> bool:
    return bool(p) and p.get("type") == "ByteLevel" and p.get("use_regex", True)


def llama_cpp_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (how text is split before BPE): GPT-2's regex
    ("gpt-2"), or digits split one by one before it (SmolLM's, "smollm"). Others get llama.cpp's
    "default" split, with a warning: llama.cpp may then cut some text into other tokens."""
    if _byte_level_regex(pre_tokenizer):
        return "gpt-2"
    parts = (pre_tokenizer or {}).get("pretokenizers", [])
    if (pre_tokenizer or {}).get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Digits" \
            and parts[0].get("individual_digits") and _byte_level_regex(parts[1]):
        return "smollm"
    warnings.warn(f"GGUF: llama.cpp has no known name for this tokenizer's pre-tokenizer ({json.dumps(pre_tokenizer)[:200]}); "
                  "writing its 'default' split, which may tokenize some text differently from transformers", stacklevel=2)
    return "default"


def _tokenizer(writer, source: ExportSource, folder: Path) -> None:
    """The BPE vocabulary and merges (llama.cpp's "gpt2" tokenizer model), special tokens from the
    tokenizer's own files (gguf's SpecialVocab reads them)."""
    import gguf

    tok = source.tokenizer
    if tok is None or not getattr(tok, "is_fast", False):
        raise ExportError("GGUF needs the model's tokenizer as a fast (tokenizer.json) BPE tokenizer; this checkpoint has none")
    tok_dir = folder / ".tokenizer"
    tok.save_pretrained(tok_dir)

    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export handles BPE tokenizers (tokenizer.json), not {model.get('type')}: sentencepiece vocabularies are not written yet")
    if model.get("byte_fallback") or "Metaspace" in json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")]):
        # llama.cpp reads such a vocabulary as its "llama" (SentencePiece) model, with scores and byte
        # tokens; writing it as GPT-2 BPE would load and then tokenize wrongly.
        raise ExportError("GGUF export writes byte-level (GPT-2 style) BPE vocabularies; this tokenizer is SentencePiece-style "
                          "(byte fallback / Metaspace, as Llama-2 and Mistral use), which is not written yet: export another "
                          "format, or convert the fake export with llama.cpp's convert_hf_to_gguf.py")
    vocab = tok.get_vocab()
    size = source.config.vocab_size
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    tokens, types = [], []
    for i in range(size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else (gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=size).add_to_gguf(writer, quiet=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()


def _quantized(source: ExportSource, name: str, preset: str) -> tuple[np.ndarray, str]:
    w = source.layers[name]
    n_layers = source.config.num_hidden_layers
    c = source.config
    gqa = c.num_attention_heads // (getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    kind = tensor_type(preset, name, _layer_index(source, name), n_layers, gqa)
    q, scales, zeros = w.q, w.scales, w.zeros
    rows = _rope_rows(name, q.shape[0], source.config)
    if rows is not None:
        q, scales, zeros = q[rows], scales[rows], zeros[rows]
    try:
        return encode(kind, q, scales, zeros, w.scheme.bits), kind
    except BlockError as e:
        raise ExportError(
            f"layer {name} ({w.scheme.name}) cannot be stored as {kind} (gguf:{preset}): {e}. Quantize with a scheme "
            "the preset holds (README: GGUF), or pick another gguf type"
        ) from None


@exporter("gguf", options=tuple(PRESETS), summary="llama.cpp GGUF; our codes in Q4_0/Q4_1/Q8_0/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K blocks",
          requires=GGUF)
def write_gguf(source: ExportSource, folder: Path, option: str | None) -> None:
    import gguf

    if source.config.model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export writes the llama architecture ({', '.join(ARCHITECTURES)}), not {source.config.model_type}")
    n_layers = source.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    path = folder / f"{source.name}-{option.upper()}.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _metadata(writer, source, PRESETS[option][1])
    _tokenizer(writer, source, folder)
    entries = [(k, None) for k in source.tensors] + [(f"{n}.weight", n) for n in source.layers]
    for key, layer in sorted(entries):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"tensor {key} has no GGUF name in the llama architecture")
        if layer is not None:
            data, kind = _quantized(source, layer, option)
        else:
            t = source.tensors[key].detach().cpu()
            rows = _rope_rows(key.removesuffix(".weight"), t.shape[0], source.config) if t.ndim == 2 else None
            data, kind = _float_tensor(t[rows] if rows is not None else t)
        # Block types and BF16 arrive as bytes per row; gguf derives the weight shape from the type.
        writer.add_tensor(gname, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind) if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
