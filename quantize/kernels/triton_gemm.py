"""Weight-only int GEMM in Triton, reading packed weights directly (no dequantized copy in memory,
except the opt-in large-M fallback described below).

Kernel layout ("slice layout", made once at load time by :func:`kernel_form` from any checkpoint
layout): K is cut into chunks of ``C = S * R`` rows; chunk ``c`` is ``R`` rows of int32 words
``[R, N]`` (``3R`` rows for 3 bits) and slice ``s`` of the chunk (bits ``s*b ..`` of every word) holds
rows ``k = c*C + s*R + r``, r < R. So one shift-and-mask of a ``[R, BLOCK_N]`` word tile yields a
``[R, BLOCK_N]`` tile of *consecutive* K rows: no reshape, no gather, contiguous activation loads, and
a tl.dot per slice. 3-bit codes are split into a 2-bit and a 1-bit plane (two words of 2-bit codes and
one word of high bits per ``R`` rows x 32 slices), so no code straddles a word; every width is exactly
``b`` bits per weight, like the checkpoint. K is zero-padded to whole chunks.

Codes are turned into floats without integer-to-float conversions (a quarter-rate instruction on
Hopper): ``bitcast(q | 0x4B000000) = 2^23 + q`` exactly, so ``q - z = that - (2^23 + z)`` in one add.

Kernels:
- ``_wq_gemv`` (decode, M <= GEMV_MAX_M): CUDA cores, one activation row per program, a 2-D float32
  accumulator reduced once at the end.
- ``_wq_dot``: tensor cores, one tl.dot per slice; ``SWAP`` computes ``(W x^T)^T`` so that small M sits
  in the MMA's N dimension (wgmma needs 64 rows in M).
- Split-K without a memset: each split writes float32 partials to a scratch buffer; the last program
  of a tile to arrive (an atomic ticket, reset by that program) sums them and writes the output.
- ``_dequant``: optional large-M fallback (dequantize to the activation dtype, then cuBLAS), used only
  where the config table says it is faster; it makes a transient ``[K, N]`` copy per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantize.kernels.dispatch import LinearSpec, register_kernel

from quantize.packing import PackedLinear, pack_bits, unpack

ROWS = {2: 16, 3: 16, 4: 32, 8: 32}  # R: K rows per slice (the tl.dot K depth)
MAGIC = tl.constexpr(0x4B000000)  # float32 2^23: bitcast(MAGIC | q) == 2^23 + q for q < 2^23


def slices(bits: int) -> int:
    return 32 if bits == 3 else 32 // bits


def chunk_rows(bits: int) -> int:
    """K rows covered by one chunk of the slice layout."""
    return slices(bits) * ROWS[bits]


def pack_slices(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` to the slice layout: int32 ``[ceil(K/C)*C*bits/32, N]``."""
    n, k = q.shape
    r, s = ROWS[bits], slices(bits)
    c = r * s
    kp = -(-k // c) * c
    qt = torch.zeros(kp, n, dtype=torch.int64, device=q.device)
    qt[:k] = q.t().to(torch.int64)
    qt = qt.reshape(kp // c, s, r, n)
    if bits == 3:
        lo, hi = qt & 3, qt >> 2
        sh2 = (torch.arange(16, device=q.device) * 2).view(1, 16, 1, 1)
        planes = [(lo[:, :16] << sh2).sum(1), (lo[:, 16:] << sh2).sum(1),
                  (hi << torch.arange(32, device=q.device).view(1, 32, 1, 1)).sum(1)]
        words = torch.stack(planes, 1)  # [chunks, 3, R, N]
    else:
        words = (qt << (torch.arange(s, device=q.device) * bits).view(1, s, 1, 1)).sum(1)
    words = words.reshape(-1, n)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_slices(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_slices` (tests): codes ``[N, K]``."""
    r, s = ROWS[bits], slices(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    n = w.shape[1]
    if bits == 3:
        w = w.reshape(-1, 3, r, n)
        j = torch.arange(16, device=w.device).view(1, 16, 1, 1)
        lo = torch.cat([(w[:, :1] >> (2 * j)) & 3, (w[:, 1:2] >> (2 * j)) & 3], 1)
        hi = (w[:, 2:3] >> torch.arange(32, device=w.device).view(1, 32, 1, 1)) & 1
        q = lo | (hi << 2)
    else:
        w = w.reshape(-1, 1, r, n)
        q = (w >> (torch.arange(s, device=w.device) * bits).view(1, s, 1, 1)) & ((1 << bits) - 1)
    return q.reshape(-1, n)[:k].t().contiguous().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _load_chunk(qw_ptr, ch, offs_r, offs_n, n_mask, stride_qk, stride_qn, BITS: tl.constexpr, R: tl.constexpr):
    """The words of chunk ``ch`` for columns ``offs_n``: ``[R, BLOCK_N]`` (three such planes for 3 bits)."""
    PLANES: tl.constexpr = 3 if BITS == 3 else 1
    ptr = qw_ptr + (ch * (PLANES * R) + offs_r)[:, None] * stride_qk + offs_n[None, :] * stride_qn
    w0 = tl.load(ptr, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
    if BITS == 3:
        w1 = tl.load(ptr + R * stride_qk, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(ptr + 2 * R * stride_qk, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _codes_f32(w0, w1, w2, s: tl.constexpr, BITS: tl.constexpr):
    """Slice ``s`` as float32 ``2^23 + q`` (exact), without an int-to-float conversion."""
    if BITS == 3:
        if s < 16:
            lo = (w0 >> (2 * s)) & 3
        else:
            lo = (w1 >> (2 * (s - 16))) & 3
        q = lo | (((w2 >> s) & 1) << 2)
    else:
        q = (w0 >> (s * BITS)) & ((1 << BITS) - 1)
    return (q | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _group_row(s_ptr, z_ptr, k_s, K, group_size, offs_n, n_mask, stride_sg, stride_sn):
    """Scales and ``2^23 + zero`` (float32 ``[BLOCK_N]``) of the group holding row ``k_s``; zero past K."""
    g = k_s // group_size
    row = n_mask & (k_s < K)
    sc = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=row, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=row, other=0.0).to(tl.float32)
    return sc, z + 8388608.0


@triton.jit
def _finish(acc, out_ptr, ws_ptr, ctr_ptr, offs_m, offs_n, M, N, tile, pid_k, stride_om, stride_on, SPLIT_K):
    """Write a float32 ``[rows, BLOCK_N]`` tile; with split-K, the last split to arrive reduces."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        idx = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + idx, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials before the ticket (release, cumulative)
        ticket = tl.atomic_add(ctr_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.load(ws_ptr + idx, mask=mask, other=0.0, cache_modifier=".cg")
            for k in range(1, SPLIT_K):
                total += tl.load(ws_ptr + k * M * N + idx, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ctr_ptr + tile, 0)  # ready for the next call (CUDA-graph replays too)


# ----------------------------------------------------------------------------------------------------
# kernels


# Sizes are not specialised (one compiled kernel serves every layer shape); strides are, for vector loads.
_NO_SPEC = ["M", "K", "group_size", "NCH", "SPLIT_K"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _wq_gemv(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, ctr_ptr,
    M, N, K, group_size, NCH,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BITS: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K,
):
    """Decode-sized M on the CUDA cores: ``sum_k x_k (q - z) s`` with ``x_k s`` formed per slice."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    S: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    C: tl.constexpr = S * R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, R)
    acc2d = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    per = tl.cdiv(NCH, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, NCH)
    for ch in range(lo, hi):
        w0, w1, w2 = _load_chunk(qw_ptr, ch, offs_r, offs_n, n_mask, stride_qk, stride_qn, BITS, R)
        for s in tl.static_range(S):
            k_s = ch * C + s * R
            offs_k = k_s + offs_r
            x = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            sc, zm = _group_row(s_ptr, z_ptr, k_s, K, group_size, offs_n, n_mask, stride_sg, stride_sn)
            acc2d += (_codes_f32(w0, w1, w2, s, BITS) - zm[None, :]) * (x[:, None] * sc[None, :])
    acc = tl.sum(acc2d, axis=0)
    offs_m = m + tl.arange(0, 1)
    _finish(acc[None, :], out_ptr, ws_ptr, ctr_ptr, offs_m, offs_n, M, N, m * tl.num_programs(0) + pid_n, pid_k,
            stride_om, stride_on, SPLIT_K)


@triton.jit(do_not_specialize=_NO_SPEC)
def _wq_dot(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, ctr_ptr,
    M, N, K, group_size, NCH,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BITS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K,
    SWAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tensor cores: per slice, dequantize ``[R, BLOCK_N]`` in registers and tl.dot it with ``x[:, slice]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    S: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    C: tl.constexpr = S * R
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_r = tl.arange(0, R)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per = tl.cdiv(NCH, SPLIT_K)
    lo = pid_k * per
    hi = tl.minimum(lo + per, NCH)
    for ch in range(lo, hi):
        w0, w1, w2 = _load_chunk(qw_ptr, ch, offs_r, offs_n, n_mask, stride_qk, stride_qn, BITS, R)
        for s in tl.static_range(S):
            k_s = ch * C + s * R
            offs_k = k_s + offs_r
            sc, zm = _group_row(s_ptr, z_ptr, k_s, K, group_size, offs_n, n_mask, stride_sg, stride_sn)
            w = ((_codes_f32(w0, w1, w2, s, BITS) - zm[None, :]) * sc[None, :]).to(x_ptr.dtype.element_ty)
            k_mask = offs_k < K
            if SWAP:
                xt = tl.load(x_ptr + offs_k[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                             mask=k_mask[:, None] & m_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(w), xt, acc, input_precision=PRECISION)
            else:
                xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                acc = tl.dot(xs, w, acc, input_precision=PRECISION)
    if SWAP:
        acc = tl.trans(acc)
    _finish(acc, out_ptr, ws_ptr, ctr_ptr, offs_m, offs_n, M, N, pid_m * tl.num_programs(1) + pid_n, pid_k,
            stride_om, stride_on, SPLIT_K)


@triton.jit
def _dequant(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, group_size, stride_qk, stride_qn, stride_sg, stride_sn,
             stride_wk, stride_wn, BITS: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dequantize chunk ``program_id(1)`` of columns ``program_id(0)`` into ``w`` ``[K, N]``."""
    pid_n = tl.program_id(0)
    ch = tl.program_id(1)
    S: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    C: tl.constexpr = S * R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, R)
    w0, w1, w2 = _load_chunk(qw_ptr, ch, offs_r, offs_n, n_mask, stride_qk, stride_qn, BITS, R)
    for s in tl.static_range(S):
        k_s = ch * C + s * R
        offs_k = k_s + offs_r
        sc, zm = _group_row(s_ptr, z_ptr, k_s, K, group_size, offs_n, n_mask, stride_sg, stride_sn)
        w = (_codes_f32(w0, w1, w2, s, BITS) - zm[None, :]) * sc[None, :]
        tl.store(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, w.to(w_ptr.dtype.element_ty),
                 mask=(offs_k < K)[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# host side

GEMV_MAX_M = 1  # one row: CUDA cores; from 2 rows the tensor-core kernel (M padded to 16) is as fast
DEQUANT_MIN_M = 128  # from this M: dequantize + cuBLAS (2-4x faster than the fused tiles in the H100 sweep)
_SMS: dict[int, int] = {}
_COUNTERS: dict[tuple, torch.Tensor] = {}
_TICKETS = 1 << 18


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device split-K tickets: zero, and left at zero by every call (the last split resets its own)."""
    key = (device.type, device.index)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(_TICKETS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _split(tiles: int, chunks: int, sms: int, waves: float) -> int:
    """Smallest power-of-two split filling ``waves`` x SMs with programs, with work left for each."""
    split = 1
    while tiles * split < waves * sms and split * 2 <= min(chunks, 16):
        split *= 2
    return split


def pick_config(m: int, n: int, k: int, bits: int, sms: int = 132) -> dict:
    """The kernel and tiles for one call: a fixed table from the H100 sweep in benchmarks/NOTES.md
    (deterministic, unlike timing-based autotuning, and nothing to tune inside a graph capture)."""
    chunks = -(-k // chunk_rows(bits))
    if m <= GEMV_MAX_M:
        return {"BLOCK_N": 64, "SPLIT_K": min(8, _pow2_floor(chunks)), "num_warps": 4, "num_stages": 2}
    if m >= DEQUANT_MIN_M:
        return {"DEQUANT": True, "BLOCK_N": 128, "num_warps": 4}
    if m <= 16:
        split = 8 if k <= 4096 else 16
        return {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": min(split, _pow2_floor(chunks)), "SWAP": False,
                "num_warps": 4, "num_stages": 2}
    bn = 64 if n * k <= 4096 * 4096 else 128
    tiles = -(-m // 64) * -(-n // bn)
    return {"BLOCK_M": 64, "BLOCK_N": bn, "SPLIT_K": _split(tiles, chunks, sms, 1.9), "SWAP": False,
            "num_warps": 4, "num_stages": 2}


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group_size: int, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``[M, K]`` and W given in the slice layout (:func:`kernel_form`) with
    float16 ``scales``/``zeros`` ``[G, N]``. ``config`` fixes the kernel and its tiles (tests, sweeps):
    with ``BLOCK_M`` the tensor-core kernel, with ``DEQUANT`` dequantize + matmul, else the GEMV kernel;
    None takes :func:`pick_config`. No host synchronisation: safe to capture in a CUDA graph."""
    m, k = x.shape
    n = qweight.shape[1]
    group = k if group_size == -1 else group_size
    r = ROWS[bits]
    nch = -(-k // chunk_rows(bits))
    cfg = dict(config) if config is not None else pick_config(m, n, k, bits, _sm_count(x.device))
    meta = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
    strides = (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1))
    if cfg.pop("DEQUANT", False):
        w = torch.empty(k, n, device=x.device, dtype=x.dtype)
        bn = cfg.get("BLOCK_N", 128)
        _dequant[(triton.cdiv(n, bn), nch)](qweight, scales, zeros, w, n, k, group, *strides, w.stride(0), w.stride(1),
                                            BITS=bits, R=r, BLOCK_N=bn, **meta)
        return x @ w
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    split = cfg["SPLIT_K"]
    # (float32 either way: one compiled kernel for every split count)
    ws = torch.empty(split if split > 1 else 0, m, n, device=x.device, dtype=torch.float32)
    ctr = _counters(x.device)
    args = (x, qweight, scales, zeros, out, ws, ctr, m, n, k, group, nch,
            x.stride(0), x.stride(1), *strides, out.stride(0), out.stride(1))
    if "BLOCK_M" in cfg:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
        assert split == 1 or grid[0] * grid[1] <= _TICKETS
        # float32 inputs are multiplied exactly (no tf32), so they reproduce the CPU reference
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _wq_dot[grid](*args, BITS=bits, R=r, PRECISION=precision, **cfg, **meta)
    else:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, m)
        assert split == 1 or grid[0] * m <= _TICKETS
        _wq_gemv[grid](*args, BITS=bits, R=r, **cfg, **meta)
    return out


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


def kernel_form(spec: LinearSpec, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """(qweight in the slice layout, float16 zero points ``[G, N]``) for any checkpoint layout."""
    q, _, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), spec.bits, spec.in_features, spec.out_features)
    return pack_slices(q, spec.bits), zeros.t().contiguous().to(torch.float16)


@register_kernel("triton")
class TritonKernel:
    priority = 10

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        if spec.bits not in ROWS:
            return f"{spec.bits}-bit weights (supported: 2, 3, 4, 8)"
        if spec.group_size != -1 and spec.group_size % ROWS[spec.bits]:
            return f"group size {spec.group_size} is not a multiple of {ROWS[spec.bits]}"
        return None

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        qw, zeros = kernel_form(spec, qweight, qzeros, scales)
        return {"qweight": qw, "zeros": zeros}

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        # The custom op only where torch.compile traces; eager calls skip its Python dispatch (~30 us a
        # call on the H100 machine, more than the kernel itself at decode sizes)
        matmul = wq_matmul_op if torch.compiler.is_compiling() else wq_matmul
        y = matmul(x.reshape(-1, shape[-1]), state["qweight"], state["scales"], state["zeros"], spec.bits, spec.group_size)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], spec.out_features)
