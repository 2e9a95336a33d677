// SwiGLU's element-wise part, silu(a) * b, forward and backward in one pass each (AVX-512).
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

using namespace loom_simd;

namespace {

inline __m512 sigmoid512(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
}

constexpr int64_t CHUNK = 4096;  // elements per parallel work item

// Calls step(i, lanes) for every 16-element vector of [0, n) (the last one masked), the
// vectors split into chunks over the threads.
template <class F>
void for_each_vector(int64_t n, int threads, F&& step) {
  parallel_for((n + CHUNK - 1) / CHUNK, threads, [&](int64_t k, int) {
    const int64_t end = std::min(n, (k + 1) * CHUNK);
    for (int64_t i = k * CHUNK; i < end; i += 16) step(i, lanes_below(static_cast<int>(end - i)));
  });
}

}  // namespace

extern "C" {

// y = silu(a) * b over n contiguous fp32 elements.
void loom_swiglu_forward(const float* a, const float* b, float* y, int64_t n, int threads) {
  for_each_vector(n, threads, [&](int64_t i, __mmask16 m) {
    const __m512 av = _mm512_maskz_loadu_ps(m, a + i);
    const __m512 silu = _mm512_mul_ps(av, sigmoid512(av));
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, b + i)));
  });
}

// da = g * b * s * (1 + a * (1 - s)), db = g * a * s, with s = sigmoid(a).
void loom_swiglu_backward(const float* g, const float* a, const float* b, float* da, float* db,
                          int64_t n, int threads) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for_each_vector(n, threads, [&](int64_t i, __mmask16 m) {
    const __m512 av = _mm512_maskz_loadu_ps(m, a + i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 s = sigmoid512(av);
    _mm512_mask_storeu_ps(db + i, m, _mm512_mul_ps(gv, _mm512_mul_ps(av, s)));
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(av, _mm512_sub_ps(one, s), one));
    _mm512_mask_storeu_ps(da + i, m, _mm512_mul_ps(_mm512_mul_ps(gv, _mm512_maskz_loadu_ps(m, b + i)), dsilu));
  });
}

}  // extern "C"
