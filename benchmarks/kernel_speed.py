"""Weight-only int GEMM kernels against bf16 torch.nn.functional.linear, on a CUDA GPU.

  python benchmarks/kernel_speed.py --json out.json            # the table: each kernel class's own dispatch
  python benchmarks/kernel_speed.py --bits 4 --kernels triton,tinygemm,tinygemm-op --graph  # W4 only, + graphs
  python benchmarks/kernel_speed.py --sweep --json sweep.json  # time candidate configs per (N, K, M), W4 g128

Times are medians of triton.testing.do_bench (CUDA events; do_bench clears L2 before every run, and
every weight set here is larger than L2 anyway for the bf16 side).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from quantize.kernels import KERNELS
from quantize.kernels import tinygemm as tg
from quantize.kernels.dispatch import LinearSpec
from quantize.kernels.triton_gemm import kernel_form, pick_config, wq_matmul

from quantize.numerics import dequantize, quantize_weight
from quantize.packing import pack

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]  # (N, K)
MS = [1, 16, 64, 256, 1024]


def random_layer(bits: int, group: int, sym: bool, n: int, k: int, device):
    """A random layer, RTN-quantized: its spec, its checkpoint tensors on ``device`` (gptq layout for sym,
    auto_round for asym) and the bf16 dequantized weight."""
    w = torch.randn(n, k, device=device) * 0.02
    q, s, z = quantize_weight(w, bits, group, sym=sym)
    layout = "gptq" if sym else "auto_round"
    p = pack(layout, q.cpu(), s.cpu(), z.cpu(), bits)
    ckpt = {"qweight": p.qweight.to(device), "qzeros": p.qzeros.to(device), "scales": p.scales.to(device)}
    return LinearSpec(bits, group, sym, layout, k, n, torch.bfloat16), ckpt, dequantize(q, s, z, torch.bfloat16)


def make(bits: int, group: int, n: int, k: int, device):
    """A random sym layer in the Triton kernel's form: (qweight, scales, zeros, bf16 weight)."""
    spec, ckpt, w_ref = random_layer(bits, group, True, n, k, device)
    qweight, zeros = kernel_form(spec, *ckpt.values())
    return qweight, ckpt["scales"], zeros, w_ref


def bench(fn, warmup=25, rep=100) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1000  # us


def candidates(m: int) -> list[dict]:
    c = []
    if m <= 4:
        c += [{"BLOCK_N": bn, "SPLIT_K": s, "num_warps": w, "num_stages": 2}
              for bn in (64, 128, 256) for s in (1, 2, 4, 8, 16) for w in (4, 8) if w == 4 or bn == 256]
    if 1 <= m <= 64:
        bms = (16,) if m <= 16 else (16, 64)
        c += [{"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": s, "SWAP": sw, "num_warps": 4, "num_stages": st}
              for bm in bms for bn in (64, 128) for s in (1, 2, 4, 8, 16) for sw in (True, False) for st in (2, 3)
              if not (st == 3 and (s in (1, 16) or bn == 64 or bm == 64)) and not (m == 1 and s < 4)]
    if m >= 128:
        c += [{"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": s, "SWAP": False, "num_warps": w, "num_stages": st}
              for bm in (64, 128) for bn in (128, 256) for s in (1, 2, 4) for w in (4, 8) for st in (2, 3)
              if not (bm == 64 and w == 8) and not (s == 4 and m > 256) and not (bn == 256 and w == 4)]
        c += [{"DEQUANT": True, "BLOCK_N": 128, "num_warps": 4}]
    return c


def _compile_worker(jobs):
    torch.manual_seed(0)
    weights = {}
    for bits, m, cfg in jobs:
        if bits not in weights:
            weights[bits] = make(bits, 128, 4096, 4096, "cuda")[:3]
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        try:
            wq_matmul(x, *weights[bits], bits, 128, cfg)
        except Exception as e:  # noqa: BLE001
            print("compile failed", bits, cfg, str(e)[-300:], flush=True)
    torch.cuda.synchronize()
    return len(jobs)


def _kernel_key(cfg: dict) -> str:
    # split counts share a compiled kernel
    return json.dumps({k: v for k, v in cfg.items() if k != "SPLIT_K"}, sort_keys=True)


def precompile_plan(workers: int, plan) -> None:
    """Compile the picked configs of a table's rows in parallel processes first."""
    import multiprocessing as mp

    first = {}
    for bits, m, n, k in plan:
        cfg = pick_config(m, n, k, bits)
        first.setdefault((bits, _kernel_key(cfg)), (bits, m, cfg))
    jobs = sorted(first.values(), key=lambda j: j[0] != 3)
    t = time.time()
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        pool.map(_compile_worker, [jobs[i::workers] for i in range(workers) if jobs[i::workers]])
    print(f"precompiled {len(jobs)} kernels in {time.time() - t:.0f} s", flush=True)


def graph_time(fns) -> float:
    """Microseconds per call of ``fns`` (one call each, over different weight copies so that L2 holds
    none of them) replayed from one CUDA graph: no Python or launch overhead."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return bench(g.replay) / len(fns)


def precompile(workers: int, other_bits=(2, 3, 8)) -> None:
    """Fill Triton's on-disk cache from several processes (compiling is most of a sweep's time): every
    W4 candidate, and the picked configs of the other widths (for the table that follows)."""
    import multiprocessing as mp

    first = {}
    for m in MS:
        for cfg in candidates(m):
            first.setdefault((4, _kernel_key(cfg)), (4, m, cfg))
    for bits in other_bits:
        for m in MS:
            cfg = pick_config(m, 4096, 4096, bits)
            first.setdefault((bits, _kernel_key(cfg)), (bits, m, cfg))
    # slow (3-bit) compiles first, spread over the workers
    jobs = sorted(first.values(), key=lambda j: j[0] != 3)
    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile_worker, [jobs[i::workers] for i in range(workers)])
    print(f"precompiled {len(jobs)} kernels in {time.time() - t:.0f} s", flush=True)


def sweep(args, dev) -> None:
    if args.workers > 1:
        try:
            precompile(args.workers)
        except Exception as e:  # noqa: BLE001
            print("precompile failed:", e)
    rows = []
    per_case = args.budget / (len(SHAPES) * len(MS))
    for n, k in SHAPES:
        qweight, scales, zeros, w_ref = make(4, 128, n, k, dev)
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = bench(lambda: F.linear(x, w_ref), 10, 40)
            results = []
            t0 = time.time()
            for cfg in candidates(m):
                if time.time() - t0 > per_case:
                    break
                try:
                    t = bench(lambda: wq_matmul(x, qweight, scales, zeros, 4, 128, cfg), 5, 25)
                except Exception as e:  # noqa: BLE001
                    print("failed", cfg, str(e)[:200])
                    continue
                results.append((t, cfg))
            results.sort(key=lambda r: r[0])
            picked = pick_config(m, n, k, 4)
            t_pick = bench(lambda: wq_matmul(x, qweight, scales, zeros, 4, 128, None), 5, 25)
            rows.append(dict(N=n, K=k, M=m, bf16_us=t_bf16, picked_us=t_pick, picked=picked,
                             top=[(round(t, 2), c) for t, c in results[:8]]))
            best = results[0] if results else (float("nan"), None)
            print(f"SWEEP {n}x{k} M={m}: bf16 {t_bf16:.1f} picked {t_pick:.1f} best {best[0]:.1f} {best[1]}", flush=True)
            for t, c in results[1:4]:
                print(f"      {t:.1f} {c}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


KERNEL_CHOICES = ("triton", "tinygemm", "tinygemm-op", "torch", "marlin", "humming", "cuda_gemv")


def vllm_single_rank(device) -> None:
    """vLLM's parallel state for one process (its parameters ask for their tensor-parallel rank)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        with set_current_vllm_config(VllmConfig()):
            ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:29533",
                                            backend="nccl" if device.type == "cuda" else "gloo")
            ps.initialize_model_parallel(1, 1)


def marlin_state(spec: LinearSpec, ckpt: dict, device) -> dict | str:
    """vLLM's Marlin kernel for this layer, prepared as the vLLM plugin prepares it (sym 4/8-bit, vLLM
    installed): its tensors, plus the kernel object under "kernel"; or why it cannot run."""
    try:
        from vllm.model_executor import parameter as vllm_parameter

        from quantize.integrations.packed_linear import make_parameters
        from quantize.integrations.vllm.linear import marlin_kernel
    except ImportError as e:
        return f"vLLM not importable ({e})"
    from quantize.scheme import Scheme

    scheme = Scheme(spec.bits, spec.group_size, spec.sym)
    n, k = spec.out_features, spec.in_features
    kernel = marlin_kernel(scheme, spec.layout, k, n, k, n, torch.bfloat16, device)
    if kernel is None:
        return "Marlin does not take this layer"
    vllm_single_rank(device)
    layer = torch.nn.Module()
    for name, p in make_parameters(vllm_parameter, scheme, spec.layout, k, n, None).items():
        p.data = ckpt[name].clone()
        layer.register_parameter(name, p)
    layer.scales.data = layer.scales.data.to(torch.bfloat16)
    kernel.process_weights_after_loading(layer)
    tensors = {name: getattr(layer, name) for name in ("qweight", "scales", "g_idx", "w_zp", "g_idx_sort_indices")}
    return {**tensors, "kernel": kernel}


def make_layer(bits: int, group: int, sym: bool, n: int, k: int, device, kernels):
    """A random layer (:func:`random_layer`) and each kernel's state for it."""
    spec, ckpt, w_ref = random_layer(bits, group, sym, n, k, device)
    states, shared = {}, None
    for name in kernels:
        if name == "marlin":
            try:
                st = marlin_state(spec, ckpt, device)
            except Exception as e:  # noqa: BLE001  (a benchmark row, not a product path: report and go on)
                st = f"failed: {type(e).__name__}: {str(e)[:300]}"
            if isinstance(st, str):
                print(f"  marlin: skipped ({st})")
            else:
                states[name] = st
            continue
        cls = KERNELS["tinygemm" if name == "tinygemm-op" else name]
        why = cls.unsupported(spec, device)
        if why:
            print(f"  {name}: skipped ({why})")
            continue
        if name in ("triton", "tinygemm", "tinygemm-op") and KERNELS["tinygemm"].unsupported(spec, device) is None:
            # tinygemm's state is Triton's plus its own tensors: prepare once, serve all three
            if shared is None:
                shared = {**ckpt, **KERNELS["tinygemm"].prepare(spec, *ckpt.values())}
            states[name] = shared
            continue
        states[name] = {**ckpt, **cls.prepare(spec, *ckpt.values())}
    return spec, states, w_ref


def call(name: str, spec: LinearSpec, state: dict, x: torch.Tensor):
    if name == "tinygemm-op":  # the op itself at every M (to place the cutover)
        return lambda: tg.int4_mm(x, state["tg_weight"], spec.group_size, state["tg_sz"])
    if name == "marlin":  # the kernel reads its tensors as attributes of a layer
        layer = SimpleNamespace(**{key: t for key, t in state.items() if key != "kernel"})
        return lambda: state["kernel"].apply_weights(layer, x, None)
    cls = KERNELS[name]
    return lambda: cls.apply(spec, state, x, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--asym", action="store_true", help="asymmetric weights (auto_round layout); default sym (gptq)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget", type=float, default=200.0, help="sweep: seconds of timing at most")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--bits", default="4,2,3,8")
    ap.add_argument("--kernels", default="triton,tinygemm",
                    help=f"comma list of {', '.join(KERNEL_CHOICES)} (tinygemm: the dispatch class, tinygemm for "
                         "bf16 and small M, Triton above; tinygemm-op: torch's op at every M)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="M values for 4-bit rows")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="first this many (N, K) shapes for 4-bit rows")
    ap.add_argument("--other-ms", default="1,16,64,256")
    ap.add_argument("--other-shapes", type=int, default=4)
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays over 8 weight copies (M <= 64)")
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    for name in kernels:
        if name not in KERNEL_CHOICES:
            ap.error(f"unknown kernel {name!r}; choose from {', '.join(KERNEL_CHOICES)}")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.sweep:
        sweep(args, dev)
        return
    sym = not args.asym
    print(f"group {args.group} {'sym' if sym else 'asym'}; times in us (do_bench medians); xN = bf16 time / kernel time")
    bits_list = [int(b) for b in args.bits.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    plan = [(4, m, n, k) for (n, k) in SHAPES[: args.shapes] for m in ms] if 4 in bits_list else []
    other_ms = [int(v) for v in args.other_ms.split(",")]
    plan += [(b, m, n, k) for b in bits_list if b != 4 for (n, k) in SHAPES[: args.other_shapes] for m in other_ms]
    if args.workers > 1 and ("triton" in kernels or "tinygemm" in kernels):
        try:
            precompile_plan(args.workers, plan)
        except Exception as e:  # noqa: BLE001
            print("precompile failed:", e)
    rows = []
    cache = {}
    for bits, m, n, k in plan:
        if (bits, n, k) not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[(bits, n, k)] = make_layer(bits, args.group, sym, n, k, dev, kernels)
        spec, states, w_ref = cache[(bits, n, k)]
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, w_ref).float()
        t_bf16 = bench(lambda: F.linear(x, w_ref))
        row = {"bits": bits, "group": args.group, "sym": sym, "M": m, "N": n, "K": k, "bf16_us": t_bf16}
        line = f"{bits:>2} g{args.group:<3} {'sym' if sym else 'asym':4} M={m:<5} {n:>5}x{k:<5} bf16 {t_bf16:7.1f}"
        copies = None
        if args.graph and m <= 64:
            # 8 copies of the weights (and of each distinct kernel state), so that L2 holds none of them
            distinct = {id(st): st for st in states.values()}
            copies = [(w_ref.clone(), {i: {key: t.clone() if torch.is_tensor(t) else t for key, t in st.items()} for i, st in distinct.items()})
                      for _ in range(8)]
            row["graph_bf16_us"] = g_bf16 = graph_time([lambda c=c: F.linear(x, c[0]) for c in copies])
            line += f" (graph {g_bf16:.1f})"
        for name, state in states.items():
            fn = call(name, spec, state, x)
            out = fn().float()
            err = ((out - ref).norm() / ref.norm()).item()
            t = bench(fn)
            row[name] = {"us": t, "speedup": t_bf16 / t, "rel_err": err}
            line += f" | {name} {t:7.1f} {t_bf16 / t:5.2f}x err {err:.1e}"
            if copies is not None:
                g = graph_time([call(name, spec, c[1][id(state)], x) for c in copies])
                row[name].update(graph_us=g, graph_speedup=row["graph_bf16_us"] / g)
                line += f" graph {g:.1f} {row['graph_bf16_us'] / g:.2f}x"
        del copies
        rows.append(row)
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "group_size": args.group,
                       "sym": sym, "tinygemm_max_m": tg.MAX_M, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
