"""SGLang serves this project's checkpoints on the GPU through the plugin, with no ``--quantization`` flag:
greedy text from SGLang equals the transformers integration's on the same GPU, and the OpenAI-compatible
``/v1/completions`` answers. Runs on the GPU machine of the ``device`` tool with the kit of
e2e/sglang_gpu_kit.sh and the data of e2e/sglang_gpu_data.sh (e2e/README.md, "SGLang on the GPU machine").

  python e2e/sglang_gpu.py --ckpts /tmp/sgdata --json $OUT/sglang_e2e.json

Three steps, each in its own process:
1. transformers (the image's, with this project's loader; the kit is left off the path) writes greedy
   continuations of PROMPTS for every checkpoint;
2. ``sglang.Engine`` (in-process API; one engine after another) serves each checkpoint with
   ``--attention-backend triton`` and greedy sampling; the plugin's log says which kernel each layer
   family computes with (SGLang's Marlin or quantize.kernels);
3. ``python -m sglang.launch_server`` for the checkpoints in --server; ``/v1/completions`` at
   temperature 0 must answer the first prompt with the transformers text.
Prints a table and writes JSON (``--json``, rewritten after every stage).

Seen on an H200 (2026-12-02, float16, 7 checkpoints): reference 57 s, the engines 345 s (each engine
spawns its scheduler process, about 30 s of imports; the first also compiles SGLang's small JIT kernels),
one launch_server 78 s. That is more than one 600 s call: run with ``--server ''`` first, then again with
``--resume`` (same warm machine) for the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPTS = [
    "It was the best of times, it was the worst of times,",
    "The old man looked at the sea and said",
    "Chapter I.\n\nIn the year",
]
HERE = Path(__file__).resolve()


def checkpoints(root: Path, names: str | None) -> list[Path]:
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if names:
        wanted = names.split(",")
        found = [p for p in found if p.name in wanted]
    return found


# --- 1. transformers -------------------------------------------------------------------------------------

def reference(ckpts: list[Path], dtype: str, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantize  # noqa: F401  (the transformers loader for auto_round checkpoints)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for ckpt in ckpts:
        try:
            tok = AutoTokenizer.from_pretrained(ckpt)
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype), device_map=device).eval()
            texts, ids = [], []
            with torch.no_grad():
                for prompt in PROMPTS:
                    x = tok(prompt, return_tensors="pt").input_ids.to(device)
                    y = model.generate(x, max_new_tokens=tokens, do_sample=False)[0, x.shape[1]:]
                    texts.append(tok.decode(y, skip_special_tokens=True))
                    ids.append(y.tolist())
            kernels = sorted({type(m).__name__ + ":" + getattr(getattr(m, "kernel", None), "__name__", str(getattr(m, "kernel", "")))
                              for m in model.modules() if hasattr(m, "kernel")})
            out[ckpt.name] = {"text": texts, "ids": ids, "prompt_ids": [tok(p).input_ids for p in PROMPTS], "modules": kernels[:8]}
            del model
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            out[ckpt.name] = {"error": f"{type(e).__name__}: {e}"}
    return out


# --- 2. sglang.Engine ------------------------------------------------------------------------------------

def engine_args(ckpt: Path, dtype: str) -> dict:
    return dict(model_path=str(ckpt), attention_backend="triton", sampling_backend="pytorch", dtype=dtype,
                mem_fraction_static=0.25, disable_cuda_graph=True, disable_prefill_cuda_graph=True,
                random_seed=0, log_level="info", context_length=512)


def serve_engine(ckpts: list[Path], dtype: str, tokens: int, prompt_ids: dict, results: Path) -> None:
    """One engine after another; each result goes to ``results`` (JSON) as soon as it is known, with the
    checkpoint in progress under "_current", so that a crash of SGLang (its watchdog kills this process
    when a scheduler dies) loses nothing else."""
    import sglang

    out = json.loads(results.read_text()) if results.exists() else {}
    for ckpt in ckpts:
        if ckpt.name in out:
            continue
        out["_current"] = ckpt.name
        results.write_text(json.dumps(out))
        print(f"=== ENGINE {ckpt.name}", file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            engine = sglang.Engine(**engine_args(ckpt, dtype))
            try:
                params = {"temperature": 0, "max_new_tokens": tokens}
                ids = prompt_ids.get(ckpt.name)
                if ids:  # the same token ids transformers saw
                    res = engine.generate(input_ids=ids, sampling_params=params)
                else:
                    res = engine.generate(prompt=PROMPTS, sampling_params=params)
                out[ckpt.name] = {"text": [r["text"] for r in res], "ids": [r.get("output_ids") for r in res],
                                  "seconds": time.time() - t0}
            finally:
                engine.shutdown()
        except Exception as e:  # noqa: BLE001
            out[ckpt.name] = {"error": f"{type(e).__name__}: {e}"[-3000:], "seconds": time.time() - t0}
            out.pop("_current", None)
            results.write_text(json.dumps(out))
            print(f"=== DONE {ckpt.name} {json.dumps(out[ckpt.name])[:300]}", file=sys.stderr, flush=True)
            # A failed start can leave SGLang half-imported (e.g. custom ops registered twice): the next
            # checkpoint gets a fresh process.
            sys.stderr.flush()
            os._exit(3)
        out.pop("_current", None)
        results.write_text(json.dumps(out))
        print(f"=== DONE {ckpt.name} {json.dumps(out[ckpt.name])[:300]}", file=sys.stderr, flush=True)


def kernel_lines(log: str) -> dict[str, list[str]]:
    """The plugin's 'computes with' lines of each engine's log, by checkpoint."""
    per, current = {}, None
    for line in log.splitlines():
        m = re.search(r"=== ENGINE (\S+)", line)
        if m:
            current = m.group(1)
            per[current] = []
        elif current and "quantize-llm:" in line:
            per[current].append(line.split("quantize-llm:", 1)[1].strip())
    return per


# --- 3. the OpenAI-compatible server ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_http(ckpt: Path, dtype: str, tokens: int, timeout: float = 240) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--attention-backend", "triton", "--sampling-backend", "pytorch", "--dtype", dtype, "--mem-fraction-static", "0.25",
           "--disable-decode-cuda-graph", "--disable-prefill-cuda-graph", "--context-length", "512", "--random-seed", "0"]
    log = open(f"/tmp/sglang_server_{ckpt.name}.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while True:
            if server.poll() is not None:
                return {"error": "server exited: " + Path(log.name).read_text()[-3000:]}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > timeout:
                return {"error": f"not healthy in {timeout} s: " + Path(log.name).read_text()[-3000:]}
            time.sleep(1)
        body = json.dumps({"model": str(ckpt), "prompt": PROMPTS[0], "max_tokens": tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        return {"text": answer["choices"][0]["text"], "seconds": time.time() - t0,
                "kernels": [ln.split("quantize-llm:", 1)[1].strip() for ln in Path(log.name).read_text().splitlines() if "quantize-llm:" in ln]}
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


# --- driver ----------------------------------------------------------------------------------------------

def child(args: list[str], env: dict, timeout: float) -> tuple[dict, str]:
    """Run this script in a fresh process; its last stdout line is JSON."""
    p = subprocess.Popen([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        return {"error": f"timed out after {timeout} s"}, stderr
    lines = stdout.strip().splitlines()
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: {stderr[-3000:]}"}, stderr
    return json.loads(lines[-1]), stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpts", required=True, help="folder of checkpoint folders")
    p.add_argument("--names", default=None, help="comma-separated subset")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--server", default="w4sym,w2sym", help="checkpoints also served by launch_server ('' for none)")
    p.add_argument("--ref-path", default=os.environ.get("QUANTIZE_SITE", ""),
                   help="PYTHONPATH for the transformers reference (this project without the SGLang kit)")
    p.add_argument("--json", default=None)
    p.add_argument("--engine-timeout", type=float, default=420, help="seconds for one engine process (all its checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="keep what an earlier call on this machine finished (reference, engines, servers) and do the rest")
    p.add_argument("--step", choices=["reference", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    ckpts = checkpoints(Path(args.ckpts), args.names)

    if args.step == "reference":
        print(json.dumps(reference(ckpts, args.dtype, args.tokens)))
        return
    if args.step == "engine":
        ids = json.loads(Path(args.prompt_ids).read_text()) if args.prompt_ids else {}
        serve_engine(ckpts, args.dtype, args.tokens, ids, Path(args.results))
        print("{}")
        return

    common = ["--ckpts", args.ckpts, "--dtype", args.dtype, "--tokens", str(args.tokens)] + (["--names", args.names] if args.names else [])
    # Intermediate results live in /tmp, so that a second call on the same (still warm) machine with
    # --resume goes on where a call that ran out of time stopped; --json is rewritten after every stage.
    ref_file, results, log_file = Path("/tmp/sglang_e2e_reference.json"), Path("/tmp/sglang_e2e_engine.json"), Path("/tmp/sglang_e2e_engine.log")
    server_file = Path("/tmp/sglang_e2e_server.json")
    if not args.resume:
        for f in (ref_file, results, log_file, server_file):
            f.unlink(missing_ok=True)
    ref = json.loads(ref_file.read_text()) if ref_file.exists() else {}
    if not all(c.name in ref for c in ckpts):
        t0 = time.time()
        ref, _ = child(["--step", "reference", *common], {**os.environ, "PYTHONPATH": args.ref_path}, 600)
        ref_file.write_text(json.dumps(ref))
        print(f"transformers reference: {time.time() - t0:.0f} s", flush=True)
        if "error" in ref and not any(isinstance(v, dict) for v in ref.values()):
            print(ref["error"])
    report(args, ckpts, ref, {}, "", {})
    ids_file = Path("/tmp/sglang_e2e_prompt_ids.json")
    ids_file.write_text(json.dumps({k: v["prompt_ids"] for k, v in ref.items() if isinstance(v, dict) and "prompt_ids" in v}))
    t0 = time.time()
    eng = json.loads(results.read_text()) if results.exists() else {}
    eng_log = log_file.read_text() if log_file.exists() else ""
    for _ in range(len(ckpts)):  # a crash ends one engine process; the next goes on after that checkpoint
        if all(c.name in eng for c in ckpts):
            break
        status, log = child(["--step", "engine", *common, "--prompt-ids", str(ids_file), "--results", str(results)],
                            dict(os.environ), args.engine_timeout)
        eng_log += log
        log_file.write_text(eng_log)
        eng = json.loads(results.read_text()) if results.exists() else {}
        current = eng.pop("_current", None)
        if current is not None:  # died or timed out while serving this one
            eng[current] = {"error": status.get("error", "engine process died")[-3000:]}
        elif "error" in status and not any(c.name in eng for c in ckpts):
            eng["_engine"] = {"error": status["error"][-3000:]}
        results.write_text(json.dumps(eng))
        report(args, ckpts, ref, eng, eng_log, {})
        if "_engine" in eng:
            break
    print(f"sglang.Engine: {time.time() - t0:.0f} s", flush=True)
    server = json.loads(server_file.read_text()) if server_file.exists() else {}
    for name in [n for n in args.server.split(",") if n]:
        match = [c for c in ckpts if c.name == name]
        if not match or name in server:
            continue
        t0 = time.time()
        got = serve_http(match[0], args.dtype, args.tokens)
        expected = ref.get(name, {}).get("text", [None])[0]
        got["equal_text"] = got.get("text") == expected
        server[name] = got
        server_file.write_text(json.dumps(server))
        report(args, ckpts, ref, eng, eng_log, server)
        print(f"launch_server {name}: {time.time() - t0:.0f} s, equal: {got['equal_text']}", flush=True)
    result = report(args, ckpts, ref, eng, eng_log, server)
    print(f"\n{'checkpoint':14}{'format':34}{'equal text':>11}{'equal ids':>10}  kernels (SGLang)")
    for name, row in result["checkpoints"].items():
        f = row["format"]
        fmt = f"{f['packing_format']} b{f['bits']} g{f['group_size']} {'sym' if f['sym'] else 'asym'}"
        err = row["sglang"].get("error") or row["transformers"].get("error")
        ks = "; ".join(sorted(set(k.split(" computes with ")[-1] for k in row["kernels"]))) or "-"
        print(f"{name:14}{fmt:34}{str(row['equal_text']):>11}{str(row.get('equal_ids', '-')):>10}  {ks}" + (f"  ERROR {err[:200]}" if err else ""))
    for name, got in result["server"].items():
        print(f"/v1/completions {name}: equal to transformers: {got.get('equal_text')}" + (f"  ERROR {got['error'][-300:]}" if "error" in got else ""))


def report(args, ckpts: list[Path], ref: dict, eng: dict, eng_log: str, server: dict) -> dict:
    """The result so far, written to --json."""
    result = {"dtype": args.dtype, "tokens": args.tokens, "prompts": PROMPTS, "checkpoints": {}, "server": server}
    kernels = kernel_lines(eng_log)
    for ckpt in ckpts:
        r = ref.get(ckpt.name, {"error": ref.get("error", "missing")})
        s = eng.get(ckpt.name, {"error": "not run"})
        row = {"transformers": r, "sglang": s, "kernels": kernels.get(ckpt.name, [])}
        qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config", {})
        row["format"] = {k: qc.get(k) for k in ("packing_format", "bits", "group_size", "sym")}
        row["equal_text"] = "text" in r and "text" in s and r["text"] == s["text"]
        if "ids" in r and s.get("ids") and all(x is not None for x in s["ids"]):
            row["equal_ids"] = r["ids"] == s["ids"]
        result["checkpoints"][ckpt.name] = row
    if "_engine" in eng:
        result["engine_error"] = eng["_engine"]["error"]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result

if __name__ == "__main__":
    main()
