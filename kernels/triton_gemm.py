"""Weight-only int GEMM in Triton, reading the packed weights directly (no dequantized copy).

Works on the GPTQ-style layout (``qweight`` ``[K*b/32, N]``, codes packed along K as a little-endian
bit stream, see quantize.packing). ``awq`` checkpoints are repacked into it once at load time. Zero
points are unpacked once into a small ``[G, N]`` float16 table; scales are read as stored.

Each program computes a ``BLOCK_M x BLOCK_N`` tile of ``x @ W.T`` over its share of K (split-K when
``SPLIT_K > 1``: partial sums are added atomically into a float32 buffer, which is what keeps a
decode-sized M streaming weights through every SM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantize.kernels.dispatch import LinearSpec, register_kernel
from quantize.packing import PackedLinear, pack_bits, unpack

# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_K must not exceed the group size.
_SMALL_M = [(16, n, k, s, 4, 3) for n in (32, 64) for k in (64, 128) for s in (1, 4, 8)] + [(16, 64, 32, 4, 4, 3)]
_LARGE_M = [(64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 64, 32, 1, 4, 4)]


def _configs(rows: list[tuple]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
        for m, n, k, s, w, st in rows
    ]


def _prune(configs, named_args, **kwargs):
    group, small = named_args["group_size"], named_args["M"] <= 32
    return [
        c for c in configs
        if group % c.kwargs["BLOCK_K"] == 0 and (c.kwargs["BLOCK_M"] == 16) == small
    ]


@triton.jit
def _unpack_tile(qw_ptr, offs_k, offs_n, k_mask, n_mask, stride_qk, stride_qn, BITS: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` of rows ``offs_k``: bit offset ``k*BITS`` in column n's stream."""
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32)[:, None]
    mask = k_mask[:, None] & n_mask[None, :]
    # Unsigned words, so that >> brings in zeros rather than copies of the sign bit.
    w0 = tl.load(qw_ptr + word[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = (w0 >> shift) & ((1 << BITS) - 1)
    if 32 % BITS != 0:
        # 3-bit codes may straddle two words: take the high part from the next word.
        spill = (shift + BITS) > 32
        w1 = tl.load(qw_ptr + (word[:, None] + 1) * stride_qk + offs_n[None, :] * stride_qn, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        q = tl.where(spill, q | ((w1 << (32 - shift)) & ((1 << BITS) - 1)), q)
    return q


@triton.jit
def _wq_gemm(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K: tl.constexpr, group_size, M_BUCKET,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K is a compile-time constant (a model has few distinct K): the trip count is then static.
    # Split-K interleaves tiles: program pid_k takes K tiles pid_k, pid_k + SPLIT_K, ...
    for i in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        k0 = (i * SPLIT_K + pid_k) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = _unpack_tile(qw_ptr, offs_k, offs_n, k_mask, n_mask, stride_qk, stride_qn, BITS)
        # BLOCK_K divides the group size, so the whole tile shares one row of scales and zeros.
        g = k0 // group_size
        row = n_mask & (k0 < K)  # split-K's last tiles may lie past K
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=row, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=row, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - z[None, :]) * s[None, :]).to(x.dtype)
        acc += tl.dot(x, w)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


_wq_gemm_tuned = triton.autotune(
    configs=_configs(_SMALL_M + _LARGE_M),
    key=["M_BUCKET", "N", "K", "group_size"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["out_ptr"],
)(_wq_gemm)


def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group_size: int, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[M, K]`` and W given as GPTQ-layout ``qweight`` ``[K*bits/32, N]`` with float16
    ``scales``/``zeros`` ``[G, N]``. ``config`` fixes the tile sizes (tests); None autotunes."""
    m, k = x.shape
    n = qweight.shape[1]
    group = k if group_size == -1 else group_size
    # Split-K programs add into the output, so it starts at zero.
    out = torch.zeros(m, n, device=x.device, dtype=x.dtype)
    args = (x, qweight, scales, zeros, out, m, n, k, group, _bucket(m),
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1))
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _wq_gemm_tuned[grid](*args, BITS=bits)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
        _wq_gemm[grid](*args, BITS=bits, **config)
    return out


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def gptq_form(spec: LinearSpec, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """(qweight in the GPTQ layout, float16 zero points ``[G, N]``) for any checkpoint layout."""
    q, _, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), spec.bits, spec.in_features, spec.out_features)
    if spec.layout == "awq":
        qweight = pack_bits(q, spec.bits).t().contiguous()
    return qweight, zeros.t().contiguous().to(torch.float16)


@register_kernel("triton")
class TritonKernel:
    priority = 10

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        return None

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        qw, zeros = gptq_form(spec, qweight, qzeros, scales)
        state = {"zeros": zeros}
        if qw is not qweight:
            state["qweight"] = qw
        return state

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        y = wq_matmul(x.reshape(-1, shape[-1]), state["qweight"], state["scales"], state["zeros"], spec.bits, spec.group_size)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], spec.out_features)
