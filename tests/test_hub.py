"""ModelScope instead of the Hugging Face hub: chosen with AutoRound's AR_USE_MODELSCOPE or --modelscope, for the
model and the calibration dataset; local paths never touch a hub. Offline: a stand-in ``modelscope`` module
records what would be downloaded and hands back local folders."""

import json
import sys
import types

import pytest

from quantize.calib import bundled_path
from quantize.cli import main
from quantize.hub import MODELSCOPE_ENV, use_modelscope

FAST = ["--group_size", "32", "--iters", "0", "--nsamples", "2", "--seqlen", "32", "--batch_size", "1", "--no-eval", "--quiet"]


@pytest.fixture(autouse=True)
def hub_choice(monkeypatch):
    monkeypatch.setenv(MODELSCOPE_ENV, "")  # undone after each test, also when --modelscope set it


@pytest.fixture
def modelscope(monkeypatch, tiny_llama, tmp_path):
    """A stand-in for the modelscope package (its two download functions): tiny_llama for any model id, a
    folder with a train.jsonl of the bundled text for any dataset id."""
    dataset = tmp_path / "ms-dataset"
    dataset.mkdir()
    passages = bundled_path("calib.txt").read_text().split("\n\n")[:50]
    (dataset / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    fake = types.ModuleType("modelscope")
    fake.calls = []

    def snapshot_download(repo_id):
        fake.calls.append(("model", repo_id))
        return str(tiny_llama)

    def dataset_snapshot_download(repo_id):
        fake.calls.append(("dataset", repo_id))
        return str(dataset)

    fake.snapshot_download, fake.dataset_snapshot_download = snapshot_download, dataset_snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    return fake


@pytest.mark.parametrize("value, chosen", [("1", True), ("true", True), ("TRUE", True), ("0", False), ("yes", False), ("", False)])
def test_variable_reads_as_autoround_does(monkeypatch, value, chosen):
    monkeypatch.setenv(MODELSCOPE_ENV, value)
    assert use_modelscope() is chosen


def test_variable_fetches_the_model_from_modelscope(modelscope, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(MODELSCOPE_ENV, "1")
    assert main(["org/tiny", *FAST, "--output_dir", str(tmp_path / "out")]) == 0
    assert modelscope.calls == [("model", "org/tiny")]
    assert (tmp_path / "out" / "config.json").exists()
    # The default calibration set lives on the Hugging Face hub: with ModelScope chosen, the bundled text.
    assert "calib      bundled  (ModelScope" in capsys.readouterr().out


def test_flag_fetches_model_and_dataset_from_modelscope(modelscope, tmp_path):
    assert main(["--modelscope", "org/tiny", *FAST, "--dataset", "org/calib", "--output_dir", str(tmp_path / "out")]) == 0
    assert modelscope.calls == [("model", "org/tiny"), ("dataset", "org/calib")]


def test_eval_fetches_from_modelscope(modelscope, capsys):
    assert main(["eval", "org/tiny", "--modelscope", "--seqlen", "32", "--max-windows", "1", "--quiet"]) == 0
    assert modelscope.calls == [("model", "org/tiny")]
    assert "ppl" in capsys.readouterr().out


def test_local_paths_never_touch_the_hub(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # any use of it would fail
    calib = tmp_path / "calib.txt"
    calib.write_text(bundled_path("calib.txt").read_text())
    assert main(["--modelscope", str(tiny_llama), *FAST, "--dataset", str(calib), "--output_dir", str(tmp_path / "out")]) == 0


def test_missing_modelscope_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    assert main(["--modelscope", "org/tiny", *FAST, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'modelscope' package" in err and "pip install modelscope" in err, err


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_unreachable_modelscope(modelscope, tiny_llama, kind, tmp_path, capsys):
    def offline(repo_id):
        raise ConnectionError("Failed to resolve 'modelscope.cn'")

    setattr(modelscope, "snapshot_download" if kind == "model" else "dataset_snapshot_download", offline)
    model = "org/tiny" if kind == "model" else str(tiny_llama)
    assert main(["--modelscope", model, *FAST, "--dataset", "org/calib", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after transformers' progress bars, when the model loaded first
    assert last.startswith(f"error: could not download {kind} 'org/") and "from ModelScope (ConnectionError" in last, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
