"""A missing optional package on any command-line path ends in ``error: ...`` naming the package and the pip
command, exit 2, no traceback; where a flag asks for it (--format, --dataset), before the model loads."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantize.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--group_size", "32", "--iters", "0", "--nsamples", "2", "--seqlen", "32", "--batch_size", "1", "--no-eval", "--quiet"]


def quantized_copy(tiny_llama: Path, folder: Path, quant_method: str) -> Path:
    """tiny_llama with a quantization_config naming ``quant_method``: what transformers reads to pick its loader."""
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case, missing, argv, pip", [
    ("gguf model", ["gguf"], ["{tmp}/model.gguf", *FAST], "pip install 'gguf>=0.10'"),
    ("eval gguf model", ["gguf"], ["eval", "{tmp}/model.gguf"], "pip install 'gguf>=0.10'"),
    ("gguf format", ["gguf"], ["{tiny}", *FAST, "--format", "auto_round,gguf:q4_0"], "pip install 'gguf>=0.10'"),
    ("convert to gguf", ["gguf"], ["convert", "{tiny}", "--to", "gguf:q4_k_m"], "pip install 'gguf>=0.10'"),
    ("llm_compressor format", ["compressed_tensors"], ["{tiny}", *FAST, "--format", "llm_compressor"], "pip install 'compressed-tensors>=0.17'"),
    ("convert to llm_compressor", ["compressed_tensors"], ["convert", "{tiny}", "--to", "llm_compressor"], "pip install 'compressed-tensors>=0.17'"),
    ("eval llm_compressor checkpoint", ["compressed_tensors"], ["eval", "{tmp}/compressed-tensors"], "pip install 'compressed-tensors>=0.17'"),
    ("eval gptq checkpoint", ["optimum", "gptqmodel"], ["eval", "{tmp}/gptq"], "pip install optimum"),
    ("eval awq checkpoint", ["gptqmodel"], ["eval", "{tmp}/awq"], "pip install gptqmodel"),
    ("hub dataset", ["datasets"], ["{tiny}", *FAST, "--dataset", "some-org/some-dataset"], "pip install datasets"),
])
def test_missing_package(tiny_llama, tmp_path, monkeypatch, capsys, case, missing, argv, pip):
    (tmp_path / "model.gguf").write_bytes(b"")  # never read: the package check comes first
    for method in ("compressed-tensors", "gptq", "awq"):
        quantized_copy(tiny_llama, tmp_path / method, method)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError now
    out = tmp_path / "out"
    argv = [a.replace("{tiny}", str(tiny_llama)).replace("{tmp}", str(tmp_path)) for a in argv]
    argv += ["--output_dir", str(out)] if argv[0] != "eval" else []
    assert main(argv) == 2, case
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and "Traceback" not in captured.err, captured.err
    assert f"'{missing[0]}' package" in captured.err and pip in captured.err, captured.err
    assert not out.exists()
    if "--format" in argv or "--dataset" in argv:  # refused before the model loads
        assert captured.out == ""


def test_missing_package_in_a_fresh_process(tmp_path):
    """The real entry point, no test harness: ``error: ...`` on stderr, exit 2, no traceback."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    code = f"import sys; sys.modules['gguf'] = None; from quantize.cli import main; sys.exit(main(['eval', {str(gguf)!r}]))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: reading model.gguf needs the 'gguf' package"), r.stderr
    assert "pip install 'gguf>=0.10'" in r.stderr and "Traceback" not in r.stderr
