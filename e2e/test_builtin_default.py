"""The README's first command: `python -m quantize` on the built-in default, under 10 minutes on 2 cores.
Slow (about 6 minutes): run with `python -m pytest -m slow e2e/`."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantize  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_builtin_default_run(tmp_path):
    out = tmp_path / "ckpt"
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "quantize", "--output_dir", str(out), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=900)
    seconds = time.time() - start
    assert r.returncode == 0, r.stderr
    assert seconds < 600, seconds
    assert "quantized   210 linear layers in 30 blocks" in r.stdout
    before, after = map(float, re.search(r"perplexity  ([\d.]+) -> ([\d.]+)", r.stdout).groups())
    assert after < before * 1.2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
