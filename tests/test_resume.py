"""An interrupted run resumes from its first unfinished block and writes the checkpoint an uninterrupted
run writes, byte for byte: after ``kill -9`` at whatever block it had reached, and after Ctrl-C (which
stops once the block in progress is saved). A resume with other settings or other inputs is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CALIB, REPO, build_tiny_llama

BLOCKS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("resume") / "model", hidden=64, intermediate=128, layers=BLOCKS)


def _command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantize", str(model), "--scheme", "W4A16G32", "--iters", "8", "--nsamples", "8",
            "--batch_size", "4", "--seqlen", "32", "--dataset", str(CALIB), "--no-eval", "--quiet", "--device", "cpu",
            "--output_dir", str(out), *extra]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupt(cmd, resume: Path, sig: int, after_block: int) -> subprocess.CompletedProcess:
    """Start ``cmd`` and send ``sig`` once block ``after_block`` (0-based) is saved in ``resume``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    marker = resume / f"block-{after_block:05d}.safetensors"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before block {after_block} was saved: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("whole") / "ckpt"
    run = _run(_command(model, out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (out.parent / ".ckpt.resume").exists(), "the resume state outlived the finished checkpoint"
    return _files(out)


def test_kill_9_then_rerun_gives_the_same_bytes(model, uninterrupted, tmp_path):
    out, resume = tmp_path / "ckpt", tmp_path / ".ckpt.resume"
    killed = _interrupt(_command(model, out), resume, signal.SIGKILL, after_block=1)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run left something that looks like a checkpoint"
    rerun = _run(_command(model, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_at = int(rerun.stderr.split("resuming from block ")[1].split("/")[0])
    # Block 2 (1-based) is saved; the activations after it only if writing them is cheap next to the time
    # since the last ones (ResumeState.CARRY_PACE): on a loaded machine the rerun tunes block 2 again.
    assert 2 <= resumed_at <= BLOCKS, rerun.stderr[-2000:]
    assert _files(out) == uninterrupted
    assert not resume.exists()


def test_ctrl_c_stops_at_a_block_boundary_and_resumes(model, uninterrupted, tmp_path):
    out, resume = tmp_path / "ckpt", tmp_path / ".ckpt.resume"
    stopped = _interrupt(_command(model, out), resume, signal.SIGINT, after_block=0)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "run the same command again to resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not out.exists() and (resume / "carry.safetensors").exists()
    rerun = _run(_command(model, out))
    assert rerun.returncode == 0 and "resuming from block" in rerun.stderr, rerun.stderr[-3000:]
    assert _files(out) == uninterrupted


def test_other_settings_or_inputs_refuse_to_resume(model, tmp_path):
    out, resume = tmp_path / "ckpt", tmp_path / ".ckpt.resume"
    _interrupt(_command(model, out), resume, signal.SIGKILL, after_block=0)

    other_iters = _command(model, out)
    other_iters[other_iters.index("--iters") + 1] = "9"
    refused = _run(other_iters)
    assert refused.returncode == 2 and "other settings (changed: tuning)" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr

    other_text = tmp_path / "calib.txt"
    other_text.write_text(CALIB.read_text()[::-1])
    cmd = _command(model, out)
    cmd[cmd.index("--dataset") + 1] = str(other_text)
    refused = _run(cmd)
    assert refused.returncode == 2 and "other inputs" in refused.stderr, refused.stderr[-2000:]

    fresh = _run(_command(model, out, "--overwrite", "--iters", "2"))
    assert fresh.returncode == 0 and "resuming" not in fresh.stderr, fresh.stderr[-2000:]
    assert (out / "config.json").exists() and not resume.exists()


def test_quantized_lm_head_resumes_to_the_same_bytes(model, tmp_path):
    """lm_head is rounded after the last block, from the carry a resumed run reads: the same checkpoint."""
    whole = tmp_path / "whole"
    assert _run(_command(model, whole, "--quant-lm-head")).returncode == 0
    out = tmp_path / "ckpt"
    cmd = _command(model, out, "--quant-lm-head")
    _interrupt(cmd, tmp_path / ".ckpt.resume", signal.SIGKILL, after_block=2)
    run = _run(cmd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(out) == _files(whole) and "lm_head.qweight" in _files(out)["model.safetensors"].decode("latin-1")
