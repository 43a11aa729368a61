"""FP8_STATIC layers on a CUDA GPU: the FP8 tensor-core kernels (quantize.kernels.fp8_scaled_mm; with
``--vllm`` also vLLM's CUTLASS kernel, quantize.kernels.vllm_fp8) and the exact emulation (fp_emulate)
against bf16 ``F.linear``, in the same process.

  python benchmarks/fp_kernel_speed.py --json out.json [--vllm]

Per (N, K) and M: microseconds per call (eager, do_bench medians) and per call inside one CUDA graph
over 8 weight copies (no launch cost, nothing in L2), the speedup over bf16 (bf16 time / kernel time), and
each kernel's error against exact float64 arithmetic on the scheme's FP8 codes (relative, Frobenius).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from kernel_speed import bench, graph_time

from quantize import numerics_act, numerics_fp8
from quantize.kernels import KERNELS, FPLinearSpec
from quantize.scheme import get_scheme

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
MS = [1, 16, 64, 256, 1024]
NAMES = ("fp8_scaled_mm", "fp_emulate")


def layer(n: int, k: int, device) -> list[dict[str, torch.Tensor]]:
    w = torch.randn(n, k, device=device) * 0.02
    weight, weight_scale = numerics_fp8.quantize_weight(w, "channel")
    return [{"weight": weight, "weight_scale": weight_scale, "input_scale": numerics_act.fp8_static_scale(4.0).to(device)}]


def exact(x: torch.Tensor, part: dict[str, torch.Tensor]) -> torch.Tensor:
    s = part["input_scale"]
    xq = numerics_fp8.codes(x, s).double() * s.double()
    return xq @ (part["weight"].double() * part["weight_scale"].double().reshape(-1, 1)).t()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--graph-max-m", type=int, default=64, help="also time CUDA-graph replays up to this M")
    ap.add_argument("--vllm", action="store_true", help="also vLLM's CUTLASS FP8 kernel (vLLM must import)")
    args = ap.parse_args()
    names = NAMES
    if args.vllm:
        import vllm._custom_ops  # noqa: F401  (makes quantize.kernels.vllm_fp8 available)

        names = ("vllm_fp8", *NAMES)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    scheme = get_scheme("FP8_STATIC")
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}; times in us; xN = bf16 time / kernel time")
    rows = []
    for n, k in SHAPES:
        parts = layer(n, k, dev)
        spec = FPLinearSpec(scheme, k, n, torch.bfloat16)
        for name in names:
            assert KERNELS[name].unsupported(spec, dev) is None, (name, KERNELS[name].unsupported(spec, dev))
        states = {name: KERNELS[name].prepare(spec, parts) for name in names}
        w_bf16 = states["fp_emulate"]["weight"]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = exact(x, parts[0])
            t_bf16 = bench(lambda: F.linear(x, w_bf16))
            row = {"M": m, "N": n, "K": k, "bf16_us": t_bf16}
            line = f"M={m:<5} {n:>5}x{k:<5} bf16 {t_bf16:7.1f}"
            copies = None
            if m <= args.graph_max_m:
                copies = [{name: {key: t.clone() for key, t in st.items()} for name, st in states.items()} for _ in range(8)]
                row["graph_bf16_us"] = g_bf16 = graph_time([lambda c=c: F.linear(x, c["fp_emulate"]["weight"]) for c in copies])
                line += f" (graph {g_bf16:.1f})"
            for name in names:
                kernel, state = KERNELS[name], states[name]
                out = kernel.apply(spec, state, x, None)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                t = bench(lambda: kernel.apply(spec, state, x, None))
                row[name] = {"us": t, "speedup": t_bf16 / t, "rel_err": err}
                line += f" | {name} {t:7.1f} {t_bf16 / t:5.2f}x err {err:.1e}"
                if copies is not None:
                    g = graph_time([lambda c=c: kernel.apply(spec, c[name], x, None) for c in copies])
                    row[name].update(graph_us=g, graph_speedup=row["graph_bf16_us"] / g)
                    line += f" graph {g:.1f} {row['graph_bf16_us'] / g:.2f}x"
            del copies
            rows.append(row)
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "scheme": "FP8_STATIC", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
