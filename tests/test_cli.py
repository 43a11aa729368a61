"""The command line: a real run on a small model, evaluation, and every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CALIB, build_tiny_llama, shared_path

REPO = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """A real run of the command line on a random 2-block Llama (widths 256/512), W4A16 with one layer at 8 bits."""
    work = tmp_path_factory.mktemp("cli")
    src = build_tiny_llama(work / "llama", hidden=256, intermediate=512, layers=2)
    out = work / "w4"
    r = run(src, "--scheme", "W4A16", "--iters", "1", "--nsamples", "4", "--seqlen", "64", "--batch-size", "2",
            "--dataset", CALIB, "--output-dir", out, "--layer_config", '{"layers.0.mlp.down_proj": {"bits": 8}}', "--quiet")
    return out, r


def test_quantize_then_eval(w4):
    out, r = w4
    assert r.returncode == 0, r.stderr
    assert "quantized   14 linear layers in 2 blocks" in r.stdout
    assert "lm_head" in r.stdout and f"checkpoint  {out}" in r.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"] == {"model.layers.0.mlp.down_proj": {"bits": 8}}

    r = run("eval", out, "--tasks", "ppl", "--max-windows", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "ppl" in r.stdout


def test_eval_zero_shot(w4):
    out, _ = w4
    r = run("eval", out, "--tasks", "piqa", "--limit", "8", "--tasks-dir", shared_path("data/tasks"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "piqa" in r.stdout


def test_help_teaches():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--scheme", "--bits", "--group_size", "--asym", "--iters", "--lr", "--nsamples", "--seqlen", "--batch_size",
                 "--dataset", "--format", "--output_dir", "--device_map", "--layer_config", "examples:"):
        assert flag in r.stdout
    assert "--ppl-file" in run("eval", "--help").stdout


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    nan = build_tiny_llama(root / "nan")
    from safetensors.torch import load_file, save_file
    f = nan / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    build_tiny_llama(root / "odd48", hidden=48, intermediate=80)
    from transformers import T5Config, T5ForConditionalGeneration
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64)).save_pretrained(root / "t5")
    (root / "empty.txt").write_text("\n\n")
    (root / "short.txt").write_text("Only a few words of text.")
    return root


@pytest.mark.parametrize("case, args, message", [
    ("missing path", ["./no/such/model"], "does not exist"),
    ("hub id offline", ["nobody-here/no-such-model-xyz"], "could not fetch"),
    ("unknown scheme", ["{tiny}", "--scheme", "W5A16"], "unknown scheme"),
    ("unknown preset", ["{tiny}", "--preset", "fastest"], "unknown preset"),
    ("unknown format", ["{tiny}", "--format", "exl2"], "unknown --format"),
    ("bad group size", ["{tiny}", "--group_size", "48"], "group_size=48"),
    ("bad layer_config", ["{tiny}", "--layer_config", "{bits: 8"], "not valid JSON"),
    ("group divides nothing", ["{odd}/odd48", "--group_size", "32"], "no layer can be quantized"),
    ("unsupported architecture", ["{odd}/t5"], "encoder-decoder"),
    ("nan weights", ["{odd}/nan"], "NaN or inf"),
    ("empty calibration", ["{tiny}", "--dataset", "{odd}/empty.txt"], "holds no text"),
    ("short calibration", ["{tiny}", "--dataset", "{odd}/short.txt"], "fewer than"),
    ("missing calibration", ["{tiny}", "--dataset", "./nope.txt"], "does not exist"),
])
def test_bad_input(tiny_llama, odd_models, tmp_path, capsys, case, args, message):
    args = [a.replace("{tiny}", str(tiny_llama)).replace("{odd}", str(odd_models)) for a in args]
    out = tmp_path / "out"
    group = [] if "--group_size" in args else ["--group_size", "32"]
    argv = [*args, *group, "--iters", "0", "--nsamples", "2", "--seqlen", "32", "--batch_size", "1", "--output_dir", out, "--quiet"]
    if case == "hub id offline":
        # In a process of its own: HF_HUB_OFFLINE, read when huggingface_hub is imported, makes the
        # no-network case fail at once instead of after the hub client's retries.
        r = run(*argv, env={"HF_HUB_OFFLINE": "1"})
        code, stderr, stdout = r.returncode, r.stderr, r.stdout
    else:
        # In this process (a CLI start costs ~5 s): an unexpected exception fails the test as a traceback would.
        from quantize.cli import main

        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        stdout, stderr = capsys.readouterr()
    assert code == 2, (case, stderr)
    if case == "missing path":
        assert stdout == "", stdout  # refused before the run's header
    assert message in stderr, (case, stderr)
    assert "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    common = [tiny_llama, "--group_size", "32", "--iters", "0", "--nsamples", "2", "--seqlen", "32", "--batch_size", "1",
              "--dataset", CALIB, "--output_dir", out, "--quiet"]
    r = run(*common)
    assert r.returncode == 2 and "already exists" in r.stderr and (out / "keep.txt").exists()
    r = run(*common, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left
