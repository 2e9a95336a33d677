// Softmax cross-entropy over rows of logits, with its gradient written in place (AVX-512).
//
// One call replaces max, subtract, exp, sum, log, gather, divide and scatter over a chunk of
// logits [rows, V]: each row is read three times while it sits in cache instead of once per op.
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

using namespace loom_simd;

extern "C" {

// logits [rows][V] fp32 at row stride ld; labels [rows] (ignore_index: no loss, no gradient).
// Writes loss[r] = logsumexp(row) - row[label] (0 for an ignored row) and, with want_grad,
// overwrites each row with grad_scale * (softmax(row) - one_hot(label)) (zeros when ignored).
void loom_softmax_cross_entropy(float* logits, int64_t ld, int64_t rows, int64_t V,
                                const int64_t* labels, int64_t ignore_index, float* loss,
                                float grad_scale, int want_grad, int threads) {
  parallel_for(rows, threads, [&](int64_t r, int) {
    float* x = logits + r * ld;
    const int64_t label = labels[r];
    const bool ignored = label == ignore_index || label < 0 || label >= V;
    __m512 mx = _mm512_set1_ps(NEG_INF);
    for (int64_t c = 0; c < V; c += 16)
      mx = _mm512_mask_max_ps(mx, lanes_below(static_cast<int>(V - c)), mx, _mm512_loadu_ps(x + c));
    const float row_max = _mm512_reduce_max_ps(mx);
    const float target = ignored ? 0.0f : x[label];
    const __m512 mv = _mm512_set1_ps(row_max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < V; c += 16) {
      const __mmask16 m = lanes_below(static_cast<int>(V - c));
      const __m512 p = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), mv)));
      _mm512_mask_storeu_ps(x + c, m, p);
      sum = _mm512_add_ps(sum, p);
    }
    const float total = _mm512_reduce_add_ps(sum);
    loss[r] = ignored ? 0.0f : row_max + std::log(total) - target;
    if (!want_grad) return;
    const __m512 k = _mm512_set1_ps(ignored ? 0.0f : grad_scale / total);
    for (int64_t c = 0; c < V; c += 16) {
      const __mmask16 m = lanes_below(static_cast<int>(V - c));
      _mm512_mask_storeu_ps(x + c, m, _mm512_mul_ps(k, _mm512_maskz_loadu_ps(m, x + c)));
    }
    if (!ignored) x[label] -= grad_scale;
  });
}

}  // extern "C"
