"""Weight-only int GEMM kernels against bf16 torch.nn.functional.linear, on a CUDA GPU.

  python benchmarks/kernels.py --json out.json

Times are medians of triton.testing.do_bench (CUDA events, warm caches rotated by using several
weight sets is not needed at these sizes: every weight is larger than L2 for K, N >= 4096).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from quantize.kernels.dispatch import LinearSpec
from quantize.kernels.triton_gemm import GEMV_MAX_M, _wq_gemm_tuned, _wq_gemv_tuned, gptq_form, wq_matmul
from quantize.numerics import dequantize, quantize_weight
from quantize.packing import pack

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]  # (N, K)
MS = [1, 16, 64, 256, 1024]


def make(bits: int, group: int, n: int, k: int, device):
    w = torch.randn(n, k, device=device) * 0.02
    q, s, z = quantize_weight(w, bits, group, sym=True)
    p = pack("gptq", q.cpu(), s.cpu(), z.cpu(), bits)
    qweight, zeros = gptq_form(LinearSpec(bits, group, True, "gptq", k, n), p.qweight, p.qzeros, p.scales)
    w_ref = dequantize(q, s, z, torch.bfloat16)
    return qweight.to(device), p.scales.to(device), zeros.to(device), w_ref


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1000  # us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'bits':>4} {'M':>5} {'N x K':>12} {'bf16 us':>9} {'quant us':>9} {'speedup':>8} {'rel err':>8}")
    plan = [(4, m, n, k) for (n, k) in SHAPES for m in MS]
    plan += [(b, m, n, k) for b in (2, 3, 8) for (n, k) in SHAPES[:2] for m in (1, 16, 64)]
    cache = {}
    for bits, m, n, k in plan:
        if (bits, n, k) not in cache:
            cache = {(bits, n, k): make(bits, args.group, n, k, dev)}
        qweight, scales, zeros, w_ref = cache[(bits, n, k)]
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        out = wq_matmul(x, qweight, scales, zeros, bits, args.group)
        ref = F.linear(x, w_ref)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        t_bf16 = bench(lambda: F.linear(x, w_ref))
        t_q = bench(lambda: wq_matmul(x, qweight, scales, zeros, bits, args.group))
        best = (_wq_gemv_tuned if m <= GEMV_MAX_M else _wq_gemm_tuned).best_config
        rows.append(dict(bits=bits, M=m, N=n, K=k, bf16_us=t_bf16, quant_us=t_q, speedup=t_bf16 / t_q, rel_err=err, config=str(best)))
        print(f"{bits:>4} {m:>5} {f'{n}x{k}':>12} {t_bf16:9.1f} {t_q:9.1f} {t_bf16 / t_q:7.2f}x {err:8.1e}  {best}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "group_size": args.group, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
