"""A streamed run (``--stream``: blocks read from the shards only while tuned, the checkpoint written shard
by shard from the resume folder) writes the checkpoint an in-memory run writes, byte for byte, holds at
most one block's weights at a time, resumes after ``kill -9``, and refuses what it cannot stream, saying why."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CALIB, REPO, TOKENIZER, build_tiny_llama
from test_resume import _files, _interrupt

BLOCKS = 4


def _sharded(path: Path, tied: bool = False) -> Path:
    """A tiny Llama saved in several shards (the way large models come)."""
    from transformers import AutoModelForCausalLM

    build_tiny_llama(path, layers=BLOCKS)
    model = AutoModelForCausalLM.from_pretrained(path)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    for f in path.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(path, max_shard_size="200KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _sharded(tmp_path_factory.mktemp("stream") / "model")


def _command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantize", str(model), "--scheme", "W4A16G32", "--iters", "6", "--nsamples", "8",
            "--batch_size", "4", "--seqlen", "32", "--dataset", str(CALIB), "--no-eval", "--quiet", "--device", "cpu",
            "--output_dir", str(out), *extra]


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def in_memory(model, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("mem") / "ckpt"
    run = _run(_command(model, out, "--no-stream"))
    assert run.returncode == 0 and "streamed" not in run.stdout, run.stderr[-3000:]
    return _files(out)


def test_streamed_run_writes_the_same_checkpoint(model, in_memory, tmp_path):
    out = tmp_path / "ckpt"
    run = _run(_command(model, out, "--stream"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "memory     streamed" in run.stdout
    assert _files(out) == in_memory
    assert not (tmp_path / ".ckpt.resume").exists()


def test_tied_embeddings_stream(tmp_path):
    model = _sharded(tmp_path / "tied", tied=True)
    runs = {}
    for flag in ("--stream", "--no-stream"):
        out = tmp_path / flag
        run = _run(_command(model, out, flag, "--iters", "0"))
        assert run.returncode == 0, run.stderr[-3000:]
        runs[flag] = _files(out)
    assert runs["--stream"] == runs["--no-stream"]


def test_one_block_in_memory_at_a_time(model, tmp_path):
    from quantize.layer_config import plan_layers
    from quantize.presets import TuneConfig
    from quantize.quantizer import quantize_model
    from quantize.scheme import get_scheme
    from quantize.streaming import load_streamed

    net, _, streamer = load_streamed(str(model))
    blocks = streamer.blocks
    assert all(p.is_meta for p in blocks.modules.parameters())
    assert not any(p.is_meta for n, p in net.named_parameters() if not n.startswith(blocks.prefix + "."))
    materialized = []
    load = streamer.load

    def counting_load(i):
        load(i)
        materialized.append(sum(not p.is_meta for b in blocks.modules for p in b.parameters()) // len(list(blocks.modules[i].parameters())))

    streamer.load = counting_load
    plan = plan_layers(net, blocks.prefix, get_scheme("W4A16G32"), {}, [], False)
    ids = torch.randint(0, net.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(net, blocks, plan, ids, TuneConfig(iters=2, nsamples=4, seqlen=32, batch_size=2), torch.device("cpu"),
                            progress=False, resume_folder=tmp_path / ".resume", streamer=streamer)
    assert materialized == [1] * BLOCKS
    assert all(p.is_meta for p in blocks.modules.parameters())
    assert set(result.weights) == set(plan.quantize)
    w = next(iter(result.weights.values()))
    assert w.q.dtype == torch.uint8 and w.dequantize(torch.float32).shape == w.q.shape  # read back from the block file


def test_kill_9_then_rerun_streamed_gives_the_same_bytes(model, in_memory, tmp_path):
    out, resume = tmp_path / "ckpt", tmp_path / ".ckpt.resume"
    killed = _interrupt(_command(model, out, "--stream"), resume, signal.SIGKILL, after_block=1)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    rerun = _run(_command(model, out, "--stream"))
    assert rerun.returncode == 0 and "resuming from block" in rerun.stderr, rerun.stderr[-3000:]
    assert _files(out) == in_memory


def _moe(path: Path, kind: str) -> Path:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, vocab_size=len(tok), head_dim=8)
    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, **common))
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("moe", ["qwen3_moe", "mixtral"])
def test_moe_streams(moe, tmp_path):
    """transformers 5 fuses the experts a checkpoint stores one by one (Mixtral also renames them): the
    streamed skeleton is unfused and read by checkpoint names, to the in-memory run's bytes."""
    model = _moe(tmp_path / moe, moe)
    runs = {}
    for flag in ("--stream", "--no-stream"):
        run = _run(_command(model, tmp_path / flag, flag, "--iters", "2"))
        assert run.returncode == 0, run.stderr[-3000:]
        runs[flag] = _files(tmp_path / flag)
    assert runs["--stream"] == runs["--no-stream"]


@pytest.mark.parametrize("case, match", [
    ("renamed", "has no tensor model.norm.weight"),
    ("format", "writes the auto_round format, not auto_gptq"),
    ("autoscheme", "AutoScheme"),
    ("gguf", "GGUF file"),
])
def test_what_cannot_stream_is_refused(case, match, model, tmp_path):
    out = tmp_path / "ckpt"
    if case == "renamed":
        from safetensors.torch import load_file, save_file

        renamed = _sharded(tmp_path / "renamed")
        index = renamed / "model.safetensors.index.json"
        shard = renamed / json.loads(index.read_text())["weight_map"]["model.norm.weight"]
        tensors = load_file(shard)
        tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
        save_file(tensors, shard)
        index.write_text(index.read_text().replace('"model.norm.weight"', '"model.final_norm.weight"'))
        cmd = _command(renamed, out, "--stream")
    elif case == "format":
        cmd = _command(model, out, "--stream", "--format", "auto_gptq")
    elif case == "autoscheme":
        cmd = _command(model, out, "--stream", "--schemes", "W2A16,W4A16", "--bits", "3")
    else:
        gguf = tmp_path / "m.gguf"
        gguf.write_bytes(b"GGUF")
        cmd = _command(gguf, out, "--stream")
    run = _run(cmd)
    assert run.returncode == 2 and match in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not out.exists()


@pytest.mark.parametrize("extra, streamed", [([], True), (["--format", "auto_gptq"], False)])
def test_streams_by_itself_when_the_weights_exceed_half_the_memory(model, tmp_path, capsys, monkeypatch, extra, streamed):
    """Without --stream/--no-stream the size decides; a format that needs the whole model keeps it in memory."""
    from quantize import streaming
    from quantize.cli import main

    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    assert main(_command(model, tmp_path / "ckpt", "--iters", "0", *extra)[3:]) == 0
    out, err = capsys.readouterr()
    assert ("memory     streamed" in out) is streamed
    assert "exceed half the available memory" in (out if streamed else err)


def test_checkpoint_writer_holds_one_layers_tensors_at_a_time(tmp_path):
    """Each layer's packed tensors are computed when they are written and dropped right after: a 14B-shaped
    run once kept every packed layer until the end of the write (9.9 GiB peak, not 5.7), and then a whole
    2 GB shard (6.8 GiB, 27% of the model). The files are plain safetensors, sharded by size."""
    import weakref

    from quantize.export.hf_folder import write_weights
    from quantize.streaming import deferred_parts

    alive: list[weakref.ref] = []
    most = 0

    def pack(i):
        nonlocal most
        codes = torch.full((64, 64), i, dtype=torch.int32)
        alive.append(weakref.ref(codes))
        most = max(most, sum(r() is not None for r in alive))
        return {"qweight": codes, "scales": codes[:1].float()}

    tensors = {}
    for i in range(20):
        tensors.update({f"layer{i}.{k}": f for k, f in deferred_parts(lambda i=i: pack(i), ("qweight", "scales")).items()})
    write_weights(tmp_path, tensors, max_shard_size=64 * 64 * 4 * 5)
    assert most == 1 and len(alive) == 20  # one layer at a time, each packed once
    assert len(list(tmp_path.glob("*.safetensors"))) == 5  # 4 layers a shard

    from safetensors.torch import load_file

    written = {}
    for shard in tmp_path.glob("*.safetensors"):
        written.update(load_file(shard))
    assert all(torch.equal(written[f"layer{i}.qweight"], pack(i)["qweight"]) for i in range(20))


def test_quantized_lm_head_streams(model, tmp_path):
    """--quant-lm-head: lm_head is read whole with the other tensors outside the blocks and rounded after them,
    the same bytes as an in-memory run."""
    runs = {}
    for flag in ("--stream", "--no-stream"):
        out = tmp_path / flag
        run = _run(_command(model, out, flag, "--quant-lm-head"))
        assert run.returncode == 0, run.stderr[-3000:]
        runs[flag] = _files(out)
    assert runs["--stream"] == runs["--no-stream"]
    assert '"lm_head"' in runs["--stream"]["config.json"].decode()
