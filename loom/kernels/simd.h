// Vector helpers and the parallel loop shared by loom's CPU kernels (AVX-512, OpenMP).
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace loom_simd {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2 = 0.693147180559945309f;

// exp(x) for a vector: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial (relative error < 1e-8 before rounding), times 2^n. -inf and anything below -104
// give exactly 0.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 2^x for a vector: x = n + r with |r| <= 1/2, 2^r by a degree-6 polynomial fitted for relative
// error (< 2e-9 before rounding; ~1e-7 after fp32 evaluation), times 2^n. Three operations fewer
// than exp512: attention keeps its scores in log2 units so that it can call this directly.
// -inf and anything below -150 give exactly 0.
inline __m512 exp2_512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5345810970757157e-04f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3399930903688073e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6184890717267990e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5503286421298980e-02f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022646248340607e-01f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718246459960e-01f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lanes [0, n) of a 16-lane vector (n clipped to [0, 16]).
inline __mmask16 lanes_below(int n) {
  if (n <= 0) return 0;
  if (n >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Lanes whose index is at least n (n clipped to [0, 16]).
inline __mmask16 lanes_from(int n) { return static_cast<__mmask16>(~lanes_below(n)); }

// Runs body(i, thread) for i in [0, n) on up to `threads` threads of the OpenMP pool, in static
// contiguous blocks, so that what a thread sums (its slot `thread` < threads) is the same from
// run to run. Loaded after torch, the library binds to torch's own libgomp (same soname): the
// kernels share PyTorch's threads instead of competing with them.
template <class F>
inline void parallel_for(int64_t n, int threads, F&& body) {
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
#pragma omp parallel for num_threads(used) schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i, omp_get_thread_num());
}

}  // namespace loom_simd
