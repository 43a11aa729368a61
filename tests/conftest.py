from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before Triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()
GUTENBERG = SHARED / "models" / "gutenberg-llama-29m"
CALIB = SHARED / "data" / "gutenberg" / "calib.txt"


def random_4bit_layer(group_size: int, sym: bool, layout: str, n: int, k: int, seed: int = 0):
    """A random ``[n, k]`` weight RTN-quantized to 4 bits and packed: (spec, packed tensors, (q, scales, zeros))."""
    from quantize.kernels import LinearSpec
    from quantize.numerics import quantize_weight
    from quantize.packing import pack

    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.02
    q, scales, zeros = quantize_weight(w, 4, group_size, sym)
    return LinearSpec(4, group_size, sym, layout, k, n), pack(layout, q, scales, zeros, 4), (q, scales, zeros)


def build_tiny_llama(path: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A small random Llama with the reference model's tokenizer, saved as a normal HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(GUTENBERG)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def gutenberg() -> Path:
    if not GUTENBERG.exists():
        pytest.skip(f"reference model not found at {GUTENBERG}")
    return GUTENBERG
