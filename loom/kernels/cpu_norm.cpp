// RMSNorm forward and backward over rows of fp32 [rows, D] (AVX-512), one pass per row each way
// instead of one PyTorch op per step of the formula.
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using namespace loom_simd;

namespace {

inline float dot_row(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __mmask16 m = lanes_below(static_cast<int>(D - c));
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, b + c), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

}  // namespace

extern "C" {

// y[r] = x[r] * rstd[r] * w with rstd[r] = 1 / sqrt(mean(x[r]^2) + eps). x, y [rows][D] contiguous.
void loom_rms_norm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows,
                           int64_t D, float eps, int threads) {
  parallel_for(rows, threads, [&](int64_t r, int) {
    const float* xr = x + r * D;
    const float s = 1.0f / std::sqrt(dot_row(xr, xr, D) / static_cast<float>(D) + eps);
    rstd[r] = s;
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = lanes_below(static_cast<int>(D - c));
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + c), sv), _mm512_maskz_loadu_ps(m, w + c));
      _mm512_mask_storeu_ps(y + r * D + c, m, v);
    }
  });
}

// dx[r] = (g*w - xhat * mean(g*w*xhat)) * rstd with xhat = x * rstd; dw = sum_r g[r] * xhat[r].
void loom_rms_norm_backward(const float* g, const float* x, const float* w, const float* rstd,
                            float* dx, float* dw, int64_t rows, int64_t D, int threads) {
  // Each thread sums its rows' share of dw into its own slot; the slots are added at the end.
  std::vector<float> partial(static_cast<size_t>(std::max(threads, 1)) * D, 0.0f);
  parallel_for(rows, threads, [&](int64_t r, int thread) {
    float* dw_part = partial.data() + static_cast<size_t>(thread) * D;
    const float* gr = g + r * D;
    const float* xr = x + r * D;
    const __m512 s = _mm512_set1_ps(rstd[r]);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = lanes_below(static_cast<int>(D - c));
      const __m512 gv = _mm512_maskz_loadu_ps(m, gr + c);
      const __m512 xh = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + c), s);
      acc = _mm512_fmadd_ps(_mm512_mul_ps(gv, _mm512_maskz_loadu_ps(m, w + c)), xh, acc);
      _mm512_mask_storeu_ps(dw_part + c, m, _mm512_fmadd_ps(gv, xh, _mm512_maskz_loadu_ps(m, dw_part + c)));
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / static_cast<float>(D));
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = lanes_below(static_cast<int>(D - c));
      const __m512 xh = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + c), s);
      const __m512 gw = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gr + c), _mm512_maskz_loadu_ps(m, w + c));
      _mm512_mask_storeu_ps(dx + r * D + c, m, _mm512_mul_ps(_mm512_fnmadd_ps(xh, mean, gw), s));
    }
  });
  std::memset(dw, 0, sizeof(float) * D);
  for (int t = 0; t < std::max(threads, 1); ++t)
    for (int64_t c = 0; c < D; ++c) dw[c] += partial[static_cast<size_t>(t) * D + c];
}

}  // extern "C"
