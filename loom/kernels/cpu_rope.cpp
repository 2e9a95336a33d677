// Rotary position embedding in one pass (AVX-512): out = (x1 cos - x2 sin, x2 cos + x1 sin) for
// the halves x1, x2 of each head; sign = -1 rotates back (the gradient).
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

using namespace loom_simd;

extern "C" {

// x, out [B, L, H, E] contiguous; cos, sin [L, E/2] (batched = 0) or [B, L, E/2] (batched = 1).
void loom_rope(const float* x, const float* cos, const float* sin, float* out, int64_t B, int64_t L,
               int64_t H, int64_t E, int batched, float sign, int threads) {
  const int64_t half = E / 2, rows = B * L;
  parallel_for(rows, threads, [&](int64_t bl, int) {
    const int64_t angle_row = batched ? bl : bl % L;
    const float* c = cos + angle_row * half;
    const float* s = sin + angle_row * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* x1 = x + (bl * H + h) * E;
      const float* x2 = x1 + half;
      float* o1 = out + (bl * H + h) * E;
      float* o2 = o1 + half;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 m = lanes_below(static_cast<int>(half - i));
        const __m512 cv = _mm512_maskz_loadu_ps(m, c + i);
        const __m512 sv = _mm512_mul_ps(_mm512_set1_ps(sign), _mm512_maskz_loadu_ps(m, s + i));
        const __m512 a = _mm512_maskz_loadu_ps(m, x1 + i), b = _mm512_maskz_loadu_ps(m, x2 + i);
        _mm512_mask_storeu_ps(o1 + i, m, _mm512_fnmadd_ps(b, sv, _mm512_mul_ps(a, cv)));
        _mm512_mask_storeu_ps(o2 + i, m, _mm512_fmadd_ps(a, sv, _mm512_mul_ps(b, cv)));
      }
    }
  });
}

}  // extern "C"
