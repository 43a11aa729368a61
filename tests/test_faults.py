"""Bad sources and failing disks: each a clear error that names the file and the fix, with nothing
half-written left where the checkpoint goes and the tuned state kept for the next run."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from conftest import CALIB, build_tiny_llama
from quantize import cli
from quantize.export import hf_folder


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), "--scheme", "W4A16G32", "--iters", "2", "--nsamples", "4", "--batch_size", "2", "--seqlen", "32",
            "--dataset", str(CALIB), "--no-eval", "--quiet", "--device", "cpu", "--output_dir", str(out), *extra]


@pytest.fixture
def model(tmp_path) -> Path:
    return build_tiny_llama(tmp_path / "model", hidden=64, intermediate=128, layers=2)


def _fails(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_truncated_shard_is_named(model, tmp_path, capsys):
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    err = _fails(capsys, _args(model, tmp_path / "out"))
    assert f"{shard} is truncated or corrupt: it should hold {len(data)} bytes but has {len(data) - 100}" in err
    assert "download or copy it again" in err
    shard.write_bytes(data[:5])
    assert "too short for a safetensors header" in _fails(capsys, _args(model, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_shard_missing_from_the_index_is_named(model, tmp_path, capsys):
    (model / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                       "model.embed_tokens.weight": "model.safetensors"}}))
    err = _fails(capsys, _args(model, tmp_path / "out"))
    assert "names shard model-00002-of-00002.safetensors, missing from" in err


def test_read_only_output_is_refused_before_any_work(model, tmp_path, capsys):
    if os.geteuid() == 0:
        out = Path("/sys/quantize-llm-test/ckpt")  # root writes through file modes; /sys refuses even root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "ckpt"
    err = _fails(capsys, _args(model, out))
    assert f"cannot write in {out.parent}" in err and "choose a writable --output_dir" in err


def test_disk_full_while_writing_keeps_the_tuned_state(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def full(shard, name, tensor):
        shard.f.write(b"partial")  # a part of the file reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shard.path))

    monkeypatch.setattr(hf_folder._ShardFile, "add", full)
    err = _fails(capsys, _args(model, out))
    assert f"writing {out} failed at {out / 'model.safetensors.part'}: No space left on device" in err
    assert "tuned weights are kept in" in err and "run the same command again" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    assert (tmp_path / ".out.resume" / "carry.safetensors").exists()

    monkeypatch.undo()
    assert cli.main(_args(model, out)) == 0
    assert "all 2 blocks were tuned by an earlier run" in capsys.readouterr().err  # it only writes
    assert (out / "model.safetensors").exists() and not (tmp_path / ".out.resume").exists()
