"""A CPU kernel for 2/3/4/8-bit layers of float32 models (decode), compiled at first use with the
machine's C++ compiler through torch's extension loader.

Why: on CPUs without fast bf16 (AVX2-only; bf16 products there are ~70x slower than float32) models run
in float32, and PyTorch's CPU int4 op is 10-40x slower outside bf16, so the only path left dequantized the
whole weight on every call (0.34-0.36x the unquantized model's decode speed on a 2-core AVX2 EPYC).

The weight is kept as one byte per code ``[N, K]`` (4x fewer bytes than float32; the portable path keeps
the same), with float32 scales and ``scale * zero`` per group. Per output channel and group the kernel
sums ``q * x`` in float32 (AVX2 + FMA where the CPU has them, four output channels at a time) and applies
``scale * sum(q x) - scale * zero * sum(x)``, the group's dequantization ``scale * (q - zero)`` factored
out of the sum, so nothing 16- or 32-bit of the weight is ever written. Output channels are split over
torch's intra-op threads. It reads the weight once per activation row, so calls of more than ``MAX_M``
rows (long prefills) dequantize once for the call and use the float32 GEMM instead (on the 2-core AVX2 EPYC
the kernel was still the faster at 64 rows, for 1536x512 to 4096x4096).

Needs a C++ compiler and ninja (a dependency of this package): without them the dispatch says so and
keeps the portable path. The build runs at the first call that uses the kernel (about a minute, once per machine:
torch caches it), so loading a model never waits for it; a build that fails logs why, and those calls
take the portable path.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil

import torch

from quantize.kernels.dispatch import LinearSpec, register_kernel
from quantize.kernels.torch_ref import TorchKernel
from quantize.packing import PackedLinear, unpack

log = logging.getLogger("quantize.kernels")

MAX_M = 64

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// For four output channels (rows of codes q_r, group scales s_r): sum_g s_r[g] * sum_{k in g} q_r[k] x[k].
static inline void rows4(const uint8_t* const* q, const float* const* s, const float* x, int64_t K, int64_t group,
                         float* out) {
  float scalar[4] = {0.f, 0.f, 0.f, 0.f};
  const int64_t G = K / group;
#if defined(__AVX2__) && defined(__FMA__)
  // 8 codes -> 8 int32 -> 8 floats, one FMA each; four independent accumulators, scaled per group into
  // vector totals (one horizontal sum per row at the end). The compiler's own vectorization of the
  // scalar loop ran 3.6x slower on an AVX2 EPYC.
  const int64_t vec = group / 8 * 8;
  __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * group;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = o; k < o + vec; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      for (int r = 0; r < 4; ++r) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + k)));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), v, acc[r]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      total[r] = _mm256_fmadd_ps(_mm256_set1_ps(s[r][g]), acc[r], total[r]);
      float t = 0.f;
      for (int64_t k = o + vec; k < o + group; ++k) t += (float)q[r][k] * x[k];
      scalar[r] += s[r][g] * t;
    }
  }
  for (int r = 0; r < 4; ++r) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(total[r]), _mm256_extractf128_ps(total[r], 1));
    h = _mm_hadd_ps(h, h);
    scalar[r] += _mm_cvtss_f32(_mm_hadd_ps(h, h));
  }
#else
  for (int64_t g = 0; g < G; ++g)
    for (int r = 0; r < 4; ++r) {
      float t = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) t += (float)q[r][k] * x[k];
      scalar[r] += s[r][g] * t;
    }
#endif
  for (int r = 0; r < 4; ++r) out[r] = scalar[r];
}

torch::Tensor lowbit_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor szeros, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && q.dtype() == torch::kUInt8, "float32 x and uint8 codes expected");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / group;
  TORCH_CHECK(q.size(1) == K && scales.size(0) == N && scales.size(1) == G && K % group == 0, "shapes do not match");
  auto xsum = x.view({M, G, group}).sum(-1).contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = szeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4, rows = std::min<int64_t>(4, N - n0);
      const uint8_t* rowq[4];
      const float* rows_s[4];
      for (int r = 0; r < 4; ++r) {
        const int64_t n = n0 + std::min<int64_t>(r, rows - 1);  // a short last block repeats its last row
        rowq[r] = qp + n * K;
        rows_s[r] = sp + n * G;
      }
      for (int64_t m = 0; m < M; ++m) {
        float a[4];
        rows4(rowq, rows_s, xp + m * K, K, group, a);
        for (int64_t r = 0; r < rows; ++r) {
          float z = 0.f;
          for (int64_t g = 0; g < G; ++g) z += zp[(n0 + r) * G + g] * xs[m * G + g];
          yp[m * N + n0 + r] = a[r] - z;
        }
      }
    }
  });
  return y;
}
"""


@functools.cache
def toolchain_missing() -> str | None:
    """What building the extension lacks (checked without building: a model loads without waiting)."""
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "needs ninja to build its C++ extension (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "needs a C++ compiler (c++) to build its C++ extension"
    return None


@functools.cache
def _module():
    """The compiled extension, or why the build failed; built at the first call that uses it, once per
    process (torch caches the build on disk)."""
    from torch.utils import cpp_extension

    flags = ["-O3"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # else the portable loop
        flags += ["-mavx2", "-mfma"]
    log.info("loading the cpu_lowbit kernel (its first build on a machine takes about a minute)")
    try:
        return cpp_extension.load_inline("quantize_lowbit_cpu", cpp_sources=SOURCE, functions=["lowbit_mm"],
                                         extra_cflags=flags, verbose=False)
    except Exception as e:  # a broken toolchain: the portable path computes instead
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("cpu_lowbit kernel not built (%s); float32 layers keep the portable path", reason)
        return f"could not build its C++ extension: {reason}"


@register_kernel("cpu_lowbit")
class CpuLowbitKernel:
    priority = 3  # above the portable path; below tinygemm_cpu and vLLM's CPU op, which take 16-bit models

    @staticmethod
    def unsupported(spec: LinearSpec, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "CPU only"
        if spec.act_dtype != torch.float32:
            return f"takes float32 activations (16-bit models have tinygemm_cpu), not {spec.act_dtype}"
        return toolchain_missing()

    @staticmethod
    def prepare(spec: LinearSpec, qweight, qzeros, scales) -> dict[str, torch.Tensor]:
        q, scales_ng, zeros = unpack(spec.layout, PackedLinear(qweight, qzeros, scales), spec.bits, spec.in_features, spec.out_features)
        s = scales_ng.float().contiguous()
        return {"q": q.to(torch.uint8).contiguous(), "zeros_nk": zeros, "lb_scales": s, "lb_szeros": (s * zeros.float()).contiguous()}

    @staticmethod
    def apply(spec: LinearSpec, state: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        module = _module() if x.dtype == torch.float32 and x2.shape[0] <= MAX_M else None
        if module is None or isinstance(module, str):
            return TorchKernel.apply(spec, state, x, bias)
        group = spec.in_features if spec.group_size == -1 else spec.group_size
        y = module.lowbit_mm(x2, state["q"], state["lb_scales"], state["lb_szeros"], group)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], spec.out_features)
