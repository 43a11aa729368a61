"""A CUDA GEMV for 4-bit layers at decode sizes (M <= 4 rows), compiled at first use with the GPU
machine's nvcc through torch's extension loader.

Why: at M = 1 a 4-bit layer moves 3.9x fewer bytes than bf16, so a kernel that streams the weights near
HBM bandwidth is up to ~3.9x faster than cuBLAS. torch's tinygemm reaches 1.7-1.9x on the H200, vLLM's
Marlin ~1.5-2.5x (tensor-core tiles built for M >= 16), our Triton GEMV a third of the bandwidth
(benchmarks/NOTES.md). What a streaming GEMV needs:

- every weight byte loaded once, 16 bytes per thread per load, several loads in flight per thread
  (a block owns ``R`` output rows; each thread loads one 16-byte chunk of each row before computing);
- no per-weight integer-to-float conversion (I2F runs at 1/8 of the FMA rate): a 4-bit code at bit
  position ``p`` (0, 4, 8, 12) of a word OR-ed into the mantissa of 2**23 is the float ``2**23 + q 2**p``
  exactly, so one LOP3 and one FADD (subtracting ``2**23 + z 2**p``, exact) give ``(q - z) 2**p``; the
  ``2**-p`` is folded into the activations once per chunk (exact: a power of two);
- float32 sums, the group scale applied once per 32 codes, a warp-shuffle reduction per row.

Layout (made once by :func:`prepare`): codes as int32 ``[N, K/8]`` (code ``k`` in bits ``4 (k % 8)``, the
project's own bit packing), float16 scales and zeros ``[N, G]`` (zeros only for asym layers). Group sizes
that are multiples of 32 (or one group per row); K a multiple of 32; bf16 or fp16 activations.
Calls of more than ``MAX_M`` rows go to the kernel that ``fallback`` names (tinygemm or Triton), whose
tensors ``prepare`` also makes (as do all calls where the build failed: logged once). No allocation but
the output, no host synchronisation: CUDA-graph safe; under torch.compile the M choice sits inside the
``quantize::w4_gemv_by_m`` op.
"""

from __future__ import annotations

import functools
import logging
import shutil

import torch

from quantize.kernels.cpu_lowbit import toolchain_missing
from quantize.kernels.dispatch import KERNELS, LinearSpec, register_kernel
from quantize.packing import PackedLinear, pack_bits, unpack

log = logging.getLogger("quantize.kernels")

MAX_M = 4

KERNEL_SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace qgemv {

constexpr int THREADS = 128;
constexpr float MAGIC = 8388608.0f;  // 2**23

// 8 activations (16 bytes) as floats, position class p = k % 4 pre-scaled by 2**-(4p)
template <typename T> __device__ __forceinline__ void load8(const T* p, float* f);
template <> __device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
  }
}
template <> __device__ __forceinline__ void load8<__half>(const __half* p, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;  // read once: do not keep the weights in L1
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// out[m, n] = sum_k x[m, k] * s[n, g(k)] * (q[n, k] - z[n, g(k)]) (+ bias[n]); one block per R rows.
template <typename T, int M, int R, bool SYM>
__global__ void __launch_bounds__(THREADS) w4_gemv(const T* __restrict__ x, const uint4* __restrict__ w,
                                                   const __half* __restrict__ scales, const __half* __restrict__ zeros,
                                                   const T* __restrict__ bias, T* __restrict__ out, int N, int K,
                                                   int chunks_per_group, int G) {
  const int row0 = blockIdx.x * R;
  const int C = K / 32;  // 16-byte chunks (32 codes) per row
  float total[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) total[r][m] = 0.f;

  for (int c = threadIdx.x; c < C; c += THREADS) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      wv[r] = row0 + r < N ? load_stream(w + (size_t)(row0 + r) * C + c) : make_uint4(0, 0, 0, 0);
    const int g = c / chunks_per_group;
    float s[R], base[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = min(row0 + r, N - 1);
      s[r] = __half2float(scales[(size_t)n * G + g]);
      base[r] = SYM ? 8.f : __half2float(zeros[(size_t)n * G + g]);
    }
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // the chunk's four words, 8 codes each
      float xf[M][8];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        load8<T>(x + (size_t)m * K + c * 32 + j * 8, xf[m]);
#pragma unroll
        for (int i = 0; i < 8; ++i) xf[m][i] *= __uint_as_float((127u - 4u * (i % 4)) << 23);  // 2**-(4 (i % 4))
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t word = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
        const uint32_t half[2] = {word, word >> 16};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const float code = __uint_as_float((half[h] & (0xFu << (4 * p))) | 0x4B000000u);
            const float d = code - fmaf(base[r], (float)(1 << (4 * p)), MAGIC);  // (q - z) 2**(4p), exact
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] = fmaf(d, xf[m][4 * h + p], acc[r][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) total[r][m] = fmaf(s[r], acc[r][m], total[r][m]);
  }

  __shared__ float part[THREADS / 32][R * M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = total[r][m];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
      if (lane == 0) part[warp][r * M + m] = v;
    }
  __syncthreads();
  if (threadIdx.x < R * M) {
    const int r = threadIdx.x / M, m = threadIdx.x % M, n = row0 + r;
    if (n < N) {
      float v = 0.f;
#pragma unroll
      for (int i = 0; i < THREADS / 32; ++i) v += part[i][threadIdx.x];
      if (bias != nullptr) v += to_float<T>(bias[n]);
      out[(size_t)m * N + n] = from_float<T>(v);
    }
  }
}

template <typename T, int M, int R, bool SYM>
void launch(const T* x, const uint4* w, const __half* s, const __half* z, const T* b, T* out, int N, int K,
            int chunks_per_group, int G, cudaStream_t stream) {
  w4_gemv<T, M, R, SYM><<<(N + R - 1) / R, THREADS, 0, stream>>>(x, w, s, z, b, out, N, K, chunks_per_group, G);
}

template <typename T>
void dispatch(int M, bool sym, const T* x, const uint4* w, const __half* s, const __half* z, const T* b, T* out, int N,
              int K, int cpg, int G, cudaStream_t st) {
  constexpr int R = 4;
#define QGEMV_CASE(MM)                                                         \
  case MM:                                                                     \
    if (sym) launch<T, MM, R, true>(x, w, s, z, b, out, N, K, cpg, G, st);     \
    else launch<T, MM, R, false>(x, w, s, z, b, out, N, K, cpg, G, st);        \
    break;
  switch (M) { QGEMV_CASE(1) QGEMV_CASE(2) QGEMV_CASE(3) QGEMV_CASE(4) }
#undef QGEMV_CASE
}

template void dispatch<__nv_bfloat16>(int, bool, const __nv_bfloat16*, const uint4*, const __half*, const __half*,
                                      const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, cudaStream_t);
template void dispatch<__half>(int, bool, const __half*, const uint4*, const __half*, const __half*, const __half*,
                               __half*, int, int, int, int, cudaStream_t);
}  // namespace qgemv
"""

BINDING_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
""" + KERNEL_SOURCE + r"""
torch::Tensor w4_gemv(torch::Tensor x, torch::Tensor words, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                      c10::optional<torch::Tensor> bias, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4, "x must be [M, K] with 1 <= M <= 4");
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x must be a contiguous, 16-byte aligned CUDA tensor");
  TORCH_CHECK(words.scalar_type() == at::kInt && words.is_contiguous(), "codes must be contiguous int32 [N, K/8]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales must be contiguous float16 [N, G]");
  const int M = x.size(0), K = x.size(1), N = words.size(0), G = scales.size(1);
  TORCH_CHECK(K % 32 == 0 && words.size(1) * 8 == K, "K must be a multiple of 32 and match the codes");
  const int gs = group_size == -1 ? K : group_size;
  TORCH_CHECK(gs % 32 == 0 && K / gs == G, "group size must be a multiple of 32 that divides K into the scales' groups");
  const bool sym = !zeros.has_value();
  if (!sym) TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->sizes() == scales.sizes() && zeros->is_contiguous(), "zeros must be float16 like scales");
  if (bias.has_value()) TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == N && bias->is_contiguous(), "bias must be [N] in x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({M, N}, x.options());
  auto st = at::cuda::getCurrentCUDAStream();
  const auto* w = reinterpret_cast<const uint4*>(words.data_ptr<int32_t>());
  const auto* s = reinterpret_cast<const __half*>(scales.data_ptr<at::Half>());
  const auto* z = sym ? nullptr : reinterpret_cast<const __half*>(zeros->data_ptr<at::Half>());
  if (x.scalar_type() == at::kBFloat16) {
    using T = __nv_bfloat16;
    qgemv::dispatch<T>(M, sym, reinterpret_cast<const T*>(x.data_ptr<at::BFloat16>()), w, s, z,
                       bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr<at::BFloat16>()) : nullptr,
                       reinterpret_cast<T*>(out.data_ptr<at::BFloat16>()), N, K, gs / 32, G, st);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kHalf, "x must be bfloat16 or float16");
    using T = __half;
    qgemv::dispatch<T>(M, sym, reinterpret_cast<const T*>(x.data_ptr<at::Half>()), w, s, z,
                       bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr<at::Half>()) : nullptr,
                       reinterpret_cast<T*>(out.data_ptr<at::Half>()), N, K, gs / 32, G, st);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
"""

DECLARATION = ("torch::Tensor w4_gemv(torch::Tensor x, torch::Tensor words, torch::Tensor scales, "
               "c10::optional<torch::Tensor> zeros, c10::optional<torch::Tensor> bias, int64_t group_size);")


def _toolchain_missing() -> str | None:
    """What building the extension lacks (checked without building): cpu_lowbit's C++ needs, and nvcc."""
    from torch.utils import cpp_extension

    if not torch.version.cuda:
        return "this torch has no CUDA"
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "needs a CUDA compiler (nvcc) to build its CUDA extension"
    return toolchain_missing()


@functools.cache
def _module():
    """The compiled extension, or why the build failed (built once per process at the first call that
    needs it; torch caches the build on disk)."""
    from torch.utils import cpp_extension

    log.info("building the cuda_gemv kernel (about a minute, once per machine)")
    try:
        return cpp_extension.load_inline("quantize_cuda_gemv", cpp_sources=DECLARATION, cuda_sources=BINDING_SOURCE,
                                         functions=["w4_gemv"], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:  # a broken toolchain: the fallback computes instead
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("cuda_gemv kernel not built (%s); 4-bit layers keep tinygemm / Triton", reason)
        return f"could not build its CUDA extension: {reason}"


def gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``x @ W.T + bias`` for 2-D 16-bit ``x`` of at most ``MAX_M`` rows (the bias added to the float32 sums
    inside the kernel: no second launch)."""
    x = x.contiguous()
    if x.data_ptr() % 16:  # a view at an odd offset: the kernel reads activations 16 bytes at a time
        x = x.clone()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return _module().w4_gemv(x, words, scales, zeros, bias, group_size)


def built() -> bool:
    """Whether the extension is (or can now be) built; a failed build was logged once."""
    return not isinstance(_module(), str)


def fallback(spec: LinearSpec, device: torch.device) -> type:
    """The kernel for calls of more than MAX_M rows: tinygemm where it takes the layer, else Triton."""
    return KERNELS["tinygemm"] if KERNELS["tinygemm"].unsupported(spec, device) is None else KERNELS["triton"]


def mm_by_m(x: torch.Tensor, words: torch.Tensor, gemv_scales: torch.Tensor, gemv_zeros: torch.Tensor | None,
            qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, tg_weight: torch.Tensor | None,
            tg_sz: torch.Tensor | None, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """2-D ``x @ W.T + bias``: the GEMV up to MAX_M rows; above, tinygemm's choice (bf16, where it takes the
    layer) or Triton, from the fallback's tensors."""
    if x.shape[0] <= MAX_M and built():
        return gemv(x, words, gemv_scales, gemv_zeros, bias, group_size)
    if tg_weight is not None and x.dtype == torch.bfloat16:
        from quantize.kernels import tinygemm

        y = tinygemm.mm_by_m(x, tg_weight, tg_sz, qweight, scales, zeros, group_size)
    else:
        from quantize.kernels.triton_gemm import wq_matmul

        y = wq_matmul(x, qweight, scales, zeros, 4, group_size)
    return y if bias is None else y + bias.to(y.dtype)


@torch.library.custom_op("quantize::w4_gemv_by_m", mutates_args=())
def w4_gemv_by_m(x: torch.Tensor, words: torch.Tensor, gemv_scales: torch.Tensor, gemv_zeros: torch.Tensor | None,
                 qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, tg_weight: torch.Tensor | None,
                 tg_sz: torch.Tensor | None, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """:func:`mm_by_m` as an opaque operator, so that torch.compile (and vLLM, which compiles once for
    every batch size) chooses by M at each call, not once when it traces."""
    return mm_by_m(x, words, gemv_scales, gemv_zeros, qweight, scales, zeros, tg_weight, tg_sz, bias, group_size)


@w4_gemv_by_m.register_fake
def _(x, words, gemv_scales, gemv_zeros, qweight, scales, zeros, tg_weight, tg_sz, bias, group_size):
    return x.new_empty(x.shape[0], words.shape[0])


@register_kernel("cuda_gemv")
class CudaGemvKernel:
    # Below tinygemm (20) until measured on a GPU against it and Marlin (benchmarks/kernel_speed.py):
    # forced by name (``kernel: "cuda_gemv"``) meanwhile
    priority = 15

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        if spec.bits != 4:
            return f"4-bit weights only, not {spec.bits}-bit"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return f"takes bf16 or fp16 activations, not {spec.act_dtype}"
        if spec.in_features % 32 or (spec.group_size != -1 and spec.group_size % 32):
            return "needs in_features and the group size to be multiples of 32"
        if "triton" not in KERNELS:
            return "needs Triton (its kernels take the calls of more than MAX_M rows)"
        return _toolchain_missing() or fallback(spec, device).unsupported(spec, device)

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        q, scales_ng, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), 4, spec.in_features, spec.out_features)
        state = dict(fallback(spec, qweight.device).prepare(spec, qweight, qzeros, scales))
        state["gemv_words"] = pack_bits(q, 4).contiguous()
        state["gemv_scales"] = scales_ng.to(torch.float16).contiguous()
        if not spec.sym:
            state["gemv_zeros"] = zeros.to(torch.float16).contiguous()
        return state

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        matmul = w4_gemv_by_m if torch.compiler.is_compiling() else mm_by_m  # eager: no op dispatch cost
        y = matmul(x2, state["gemv_words"], state["gemv_scales"], state.get("gemv_zeros"), state["qweight"], state["scales"],
                   state["zeros"], state.get("tg_weight"), state.get("tg_sz"), bias, spec.group_size)
        return y.reshape(*shape[:-1], spec.out_features)
