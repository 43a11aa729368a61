"""Tuning spread over processes (quantize.distributed): two gloo processes on the CPU, each taking half of
every batch, write the checkpoint one process writes, bit for bit, in float32 with the rounding offsets
tuned. (The clipping factors' gradients are sums over whole groups that nearly cancel; on a random model
the two summation orders disagree in the sign of a few percent of them, one process against itself
split in two as much as two processes, so with clipping tuned the runs differ as two seeds would.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CALIB, REPO, build_tiny_llama
from quantize import cli


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("dist") / "model", hidden=64, intermediate=128, layers=2)


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), "--scheme", "W4A16G32", "--iters", "12", "--nsamples", "8", "--batch_size", "4", "--seqlen", "32",
            "--dataset", str(CALIB), "--no-eval", "--device", "cpu", "--output_dir", str(out), *extra]


def _run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    run = subprocess.run([sys.executable, *launcher, "-m", "quantize", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_processes_write_the_one_process_checkpoint(model, tmp_path):
    exact = ("--no-amp", "--disable_minmax_tuning", "--quiet")
    _run(_args(model, tmp_path / "one", *exact), 1)
    two = _run(_args(model, tmp_path / "two", *exact), 2)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert two.stdout.count("checkpoint") == 1, "only the leader reports"


def test_batch_that_does_not_split_is_refused(model, tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "quantize",
                          *_args(model, tmp_path / "out", "--batch_size", "3", "--nsamples", "6", "--quiet")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode != 0 and "--batch_size 3 does not split evenly over 2 processes" in run.stderr


def test_gpus_without_gpus_is_refused(model, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    assert cli.main(_args(model, tmp_path / "out", "--gpus", "2")) == 2
    assert "--gpus 2 asked for, but 0 GPUs are visible" in capsys.readouterr().err
