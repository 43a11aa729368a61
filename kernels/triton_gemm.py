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

# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); configs whose BLOCK_K does not divide the
# group size are pruned.
_SMALL_M = [(16, n, k, s, 4, 3) for n in (32, 64) for k in (32, 64, 128) for s in (1, 4, 8)]
_LARGE_M = [(64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 64, 32, 1, 4, 4),
            (32, 64, 64, 4, 4, 3), (64, 64, 64, 4, 4, 3), (64, 128, 64, 2, 4, 3), (32, 128, 32, 8, 4, 3)]


def _configs(rows: list[tuple]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
        for m, n, k, s, w, st in rows
    ]


def _fits_group(config, named_args, constants) -> bool:
    # Word-aligned codes read scales per word row; the 3-bit path reads one row of scales per tile.
    return 32 % constants["BITS"] == 0 or named_args["group_size"] % config.kwargs["BLOCK_K"] == 0


def _prune(configs, named_args, **constants):
    # The GEMM tile reads one row of scales, so its BLOCK_K must divide the group size.
    small = named_args["M"] <= 32
    return [c for c in configs if named_args["group_size"] % c.kwargs["BLOCK_K"] == 0 and (c.kwargs["BLOCK_M"] == 16) == small]


@triton.jit
def _unpack_tile(qw_ptr, k0, offs_n, n_mask, stride_qk, stride_qn, K: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` of rows ``k0 ..``: code k sits at bit ``k*BITS`` of column n's stream."""
    if 32 % BITS == 0:
        # Whole codes per word: load each word once and spread it over its 32/BITS rows.
        PER: tl.constexpr = 32 // BITS
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
        mask = (offs_w < K // PER)[:, None] & n_mask[None, :]
        # Unsigned words, so that >> brings in zeros rather than copies of the sign bit.
        w = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
        w = w.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        q = (w[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        bit = offs_k * BITS
        word = bit // 32
        shift = (bit % 32)[:, None]
        mask = (offs_k < K)[:, None] & n_mask[None, :]
        w0 = tl.load(qw_ptr + word[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
        q = (w0.to(tl.uint32, bitcast=True) >> shift) & ((1 << BITS) - 1)
        # 3-bit codes may straddle two words: take the high part from the next word.
        spill = (shift + BITS) > 32
        w1 = tl.load(qw_ptr + (word[:, None] + 1) * stride_qk + offs_n[None, :] * stride_qn, mask=mask & spill, other=0)
        q = tl.where(spill, q | ((w1.to(tl.uint32, bitcast=True) << (32 - shift)) & ((1 << BITS) - 1)), q)
    return q


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, stride_qk, stride_qn, stride_sg, stride_sn, group_size,
                  K: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Float32 weights ``[BLOCK_K, BLOCK_N]``; BLOCK_K divides the group size, so one row of scales and
    zeros serves the whole tile."""
    q = _unpack_tile(qw_ptr, k0, offs_n, n_mask, stride_qk, stride_qn, K, BITS, BLOCK_K, BLOCK_N)
    g = k0 // group_size
    row = n_mask & (k0 < K)  # split-K's last tiles may lie past K
    s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=row, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=row, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z[None, :]) * s[None, :]


@triton.jit
def _load_words(qw_ptr, s_ptr, z_ptr, offs_w, w_mask, offs_n, n_mask, stride_qk, stride_qn, stride_sg, stride_sn,
                group_size, PER: tl.constexpr):
    """Packed words ``[rows, BLOCK_N]`` and, per word row, its group's scales and zeros (a word's codes
    always share a group, so tiles may span several groups)."""
    mask = w_mask[:, None] & n_mask[None, :]
    words = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
    g = (offs_w * PER) // group_size
    sz = g[:, None] * stride_sg + offs_n[None, :] * stride_sn
    s2 = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    z2 = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    # Unsigned, so that >> brings in zeros rather than copies of the sign bit.
    return words.to(tl.uint32, bitcast=True), s2, z2


@triton.jit
def _gemv_words(x_row, qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, stride_xk, stride_qk, stride_qn, stride_sg,
                stride_sn, group_size, K: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """One K tile of a GEMV row on word-aligned codes: ``sum_j x_j * (q_j - z) * s`` folded as
    ``(sum_j x_j q_j - z sum_j x_j) * s``, a few instructions per weight."""
    PER: tl.constexpr = 32 // BITS
    offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
    w_mask = offs_w < K // PER
    words, s2, z2 = _load_words(qw_ptr, s_ptr, z_ptr, offs_w, w_mask, offs_n, n_mask, stride_qk, stride_qn,
                                stride_sg, stride_sn, group_size, PER)
    t = tl.zeros((BLOCK_K // PER, BLOCK_N), dtype=tl.float32)
    xs = tl.zeros((BLOCK_K // PER,), dtype=tl.float32)
    for j in tl.static_range(PER):
        x = tl.load(x_row + (offs_w * PER + j) * stride_xk, mask=w_mask, other=0.0).to(tl.float32)
        t += x[:, None] * ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        xs += x
    return (t - xs[:, None] * z2) * s2


@triton.jit
def _wq_gemv(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K: tl.constexpr, group_size, M_BUCKET,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Decode-sized M: one row of x per program, no tensor cores (nothing to gain at M = 1), reductions
    on the CUDA cores while the weights stream."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # Element-wise products accumulate in a 2-D tile; the cross-thread reduction happens once, at the end.
    ROWS: tl.constexpr = BLOCK_K // (32 // BITS) if 32 % BITS == 0 else BLOCK_K
    acc2d = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        k0 = (i * SPLIT_K + pid_k) * BLOCK_K
        if 32 % BITS == 0:
            acc2d += _gemv_words(x_ptr + m * stride_xm, qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, stride_xk,
                                 stride_qk, stride_qn, stride_sg, stride_sn, group_size, K, BITS, BLOCK_K, BLOCK_N)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, stride_qk, stride_qn, stride_sg, stride_sn,
                              group_size, K, BITS, BLOCK_K, BLOCK_N)
            acc2d += x[:, None] * w
    acc = tl.sum(acc2d, axis=0)
    out = out_ptr + m * stride_om + offs_n * stride_on
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _wq_gemm(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K: tl.constexpr, group_size, M_BUCKET,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
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
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, n_mask, stride_qk, stride_qn, stride_sg, stride_sn,
                          group_size, K, BITS, BLOCK_K, BLOCK_N).to(x.dtype)
        acc += tl.dot(x, w, input_precision=PRECISION)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


_wq_gemm_tuned = triton.autotune(
    configs=_configs(_SMALL_M + _LARGE_M),
    key=["M_BUCKET", "N", "K", "group_size", "BITS"],  # BITS too: a 4-bit best config may not fit 3-bit
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["out_ptr"],
)(_wq_gemm)

_GEMV = [(n, k, s, w) for n in (64, 128, 256) for k in (64, 256) for s in (1, 4, 8) for w in (4, 8)] + [(32, 512, 4, 4), (64, 512, 2, 4)]
_wq_gemv_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=3) for n, k, s, w in _GEMV],
    key=["M_BUCKET", "N", "K", "group_size", "BITS"],  # BITS too: a 4-bit best config may not fit 3-bit
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: [c for c in configs if _fits_group(c, named_args, kw)]},
    reset_to_zero=["out_ptr"],
)(_wq_gemv)

GEMV_MAX_M = 4  # up to here one program per row beats padding M to a 16-row tensor-core tile


def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group_size: int, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[M, K]`` and W given as GPTQ-layout ``qweight`` ``[K*bits/32, N]`` with float16
    ``scales``/``zeros`` ``[G, N]``. ``config`` fixes the kernel and its tiles (tests); None autotunes:
    the GEMV kernel up to GEMV_MAX_M rows (or when ``config`` has no BLOCK_M), the tiled GEMM above."""
    m, k = x.shape
    n = qweight.shape[1]
    group = k if group_size == -1 else group_size
    # Split-K programs add into the output, so it starts at zero.
    out = torch.zeros(m, n, device=x.device, dtype=x.dtype)
    args = (x, qweight, scales, zeros, out, m, n, k, group, _bucket(m),
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1))
    gemv = (config is None and m <= GEMV_MAX_M) or (config is not None and "BLOCK_M" not in config)
    if gemv:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)  # noqa: E731
        (_wq_gemv_tuned if config is None else _wq_gemv)[grid](*args, BITS=bits, **(config or {}))
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        # float32 inputs are multiplied exactly (no tf32), so they reproduce the CPU reference
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        (_wq_gemm_tuned if config is None else _wq_gemm)[grid](*args, BITS=bits, PRECISION=precision, **(config or {}))
    return out


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


@torch.library.custom_op("quantize::wq_matmul", mutates_args=())
def wq_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int) -> torch.Tensor:
    """:func:`wq_matmul` as an opaque operator, so torch.compile and CUDA graphs treat it as one call."""
    return wq_matmul(x, qweight, scales, zeros, bits, group_size)


@wq_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1])


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
        y = wq_matmul_op(x.reshape(-1, shape[-1]), state["qweight"], state["scales"], state["zeros"], spec.bits, spec.group_size)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], spec.out_features)
