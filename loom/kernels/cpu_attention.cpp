// loom's CPU flash attention: fp32, AVX-512, forward and backward with the log-sum-exp.
//
// Why our own: ATen's CPU flash op computes whole 512-key blocks even where the causal mask
// hides them (~1.5x the causal work at L = 1024) and runs its small products through generic
// GEMM calls. Here both products of a 64 x 64 tile run in register-blocked AVX-512 loops, the
// causal loop stops at the diagonal block, and the backward walks key blocks in the outer loop
// so that dK and dV of a block stay in cache (FlashAttention-2 order).
//
// Layout: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (Hq % Hkv == 0), out like q, lse [B, Hq, Lq];
// any strides for batch, head and row, unit stride along D. Causal means row i sees keys <= i
// (top-left aligned, as ATen's op; loom only asks for causal tiles with Lq == Lk).
// Built by loom.kernels (g++, no torch headers) and called through ctypes.
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace loom_simd;

constexpr int BQ = 64;  // query rows per tile
constexpr int BK = 64;  // keys per tile (4 vectors of 16)

// C[r][c] = sum_d A[r][d] * BT[d][c] for RB rows, c < BK: RB x 4 accumulators.
template <int D, int RB>
inline void tile_abt_rows(const float* A, const float* BT, int64_t ldb, float* C) {
  __m512 c[RB][4];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < 4; ++v) c[i][v] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const float* b = BT + d * ldb;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * D + d]);
      c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
      c[i][2] = _mm512_fmadd_ps(a, b2, c[i][2]);
      c[i][3] = _mm512_fmadd_ps(a, b3, c[i][3]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(C + i * BK + 16 * v, c[i][v]);
}

// C[r][c] = sum_d A[r][d] * BT[d][c] for r < rows, c < BK.
// A [rows][D] (row stride D), BT [D][ldb] (a packed, transposed operand), C [rows][BK].
template <int D>
void tile_abt(const float* A, const float* BT, int64_t ldb, float* C, int rows) {
  int r = 0;
  for (; r + 6 <= rows; r += 6) tile_abt_rows<D, 6>(A + r * D, BT, ldb, C + r * BK);
  for (; r + 2 <= rows; r += 2) tile_abt_rows<D, 2>(A + r * D, BT, ldb, C + r * BK);
  for (; r < rows; ++r) tile_abt_rows<D, 1>(A + r * D, BT, ldb, C + r * BK);
}

// C[r][:] += sum_{j < n} A(r, j) * B[j][:] for r < rows, with A(r, j) = A[r * ars + j * ajs]
// (so A may be read transposed), B rows of D floats at stride ldb, C rows at stride ldc.
template <int D, int RB>
inline void tile_acc_rows(const float* A, int64_t ars, int64_t ajs, const float* B, int64_t ldb,
                          float* C, int64_t ldc, int n) {
  constexpr int NV = D / 16;
  __m512 c[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) c[i][v] = _mm512_loadu_ps(C + i * ldc + 16 * v);
  for (int j = 0; j < n; ++j) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + j * ldb + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      __m512 a = _mm512_set1_ps(A[i * ars + j * ajs]);
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(a, b[v], c[i][v]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

template <int D>
void tile_acc(const float* A, int64_t ars, int64_t ajs, const float* B, int64_t ldb, float* C,
              int64_t ldc, int rows, int n) {
  constexpr int NV = D / 16;
  constexpr int RB = NV >= 24 ? 1 : 24 / NV;  // up to 24 accumulators
  int r = 0;
  for (; r + RB <= rows; r += RB) tile_acc_rows<D, RB>(A + r * ars, ars, ajs, B, ldb, C + r * ldc, ldc, n);
  for (; r < rows; ++r) tile_acc_rows<D, 1>(A + r * ars, ars, ajs, B, ldb, C + r * ldc, ldc, n);
}

struct Strides {
  int64_t b, h, l;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[d][c] = scale * src[c][d] for c < rows, 0 for rows <= c < 64: 64 contiguous rows of D floats
// transposed into a [D][64] tile, 16 rows per gather (scalar transposes were ~8% of the
// backward). src is one of the kernel's own packed copies, so the gathers read L1.
template <int D>
void pack_transposed(const float* src, int rows, float scale, float* dst) {
  static_assert(BQ == 64 && BK == 64, "tiles are 4 vectors wide");
  const __m512 sv = _mm512_set1_ps(scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int g = 0; g < 4; ++g) {
    const __mmask16 ok = lanes_below(rows - 16 * g);
    const __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * g)), _mm512_set1_epi32(D));
    for (int d = 0; d < D; ++d) {
      const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, idx, src + d, 4);
      _mm512_storeu_ps(dst + d * 64 + 16 * g, _mm512_mul_ps(sv, x));
    }
  }
}

// dst[j][:] = src[j * stride][:] for j < L. Rows a head stride apart cross a page every few rows,
// where the hardware prefetchers stop: fetch 16 rows ahead by hand (the copies were bound by
// memory latency).
template <int D>
void copy_rows(const float* src, int64_t stride, int L, float* dst) {
  for (int j = 0; j < L; ++j) {
    if (j + 16 < L)
      for (int d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(src + (j + 16) * stride + d), _MM_HINT_T0);
    std::memcpy(dst + j * D, src + j * stride, sizeof(float) * D);
  }
}

// dst[j * stride][:] = scale * src[j][:] for j < L: the way back from a packed copy to the
// caller's rows.
template <int D>
void store_rows(const float* src, int L, float scale, float* dst, int64_t stride) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int j = 0; j < L; ++j)
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(dst + j * stride + d, _mm512_mul_ps(sv, _mm512_loadu_ps(src + j * D + d)));
}

// Packs one head of k ([L][D] at row stride ks) for the kernels: Kc [L][D] contiguous, and KT in
// tiles of BK keys, KT[t][d][c] = k[t * BK + c][d] (zero past L). Contiguous tiles matter: rows of
// a plain [D][L] transpose sit a multiple of 4 KiB apart and thrash the same L1 sets.
template <int D>
void pack_head(const float* k, int64_t ks, int L, float* Kc, float* KT) {
  copy_rows<D>(k, ks, L, Kc);
  for (int j0 = 0; j0 < L; j0 += BK) pack_transposed<D>(Kc + j0 * D, std::min(BK, L - j0), 1.0f, KT + j0 * D);
}

// Scores are kept in log2 units (q is scaled by scale * log2(e) when packed), so that the
// softmax takes 2^x, which is cheaper than e^x; the log-sum-exp is returned in natural units.
template <int D>
void forward(const float* q, Strides qs, const float* k, Strides ks, const float* v, Strides vs,
             float* o, Strides os, float* lse, Strides ls, int B, int Hq, int Hkv, int Lq, int Lk,
             bool causal, float scale, int threads) {
  static_assert(BQ == 64 && BK == 64, "tiles are 4 vectors wide");
  const int rep = Hq / Hkv;
  // Each task is one query head of one sample; its K and V are packed once.
  parallel_for(B * Hq, threads, [&](int64_t task, int) {
    const int b = task / Hq, h = task % Hq, hk = h / rep;
    thread_local std::vector<float> Kc, Vc, Qc, QT, ST, acc, alpha, m_out, l_out;
    Kc.resize(static_cast<size_t>(Lk) * D);
    Vc.resize(static_cast<size_t>(Lk) * D);
    Qc.resize(BQ * D);
    QT.resize(D * BQ);
    ST.resize(BK * BQ);
    acc.resize(BQ * D);
    alpha.resize(BQ);
    m_out.resize(BQ);
    l_out.resize(BQ);
    const float* qh = q + b * qs.b + h * qs.h;
    const float* kh = k + b * ks.b + hk * ks.h;
    const float* vh = v + b * vs.b + hk * vs.h;
    float* oh = o + b * os.b + h * os.h;
    float* lh = lse + b * ls.b + h * ls.h;
    copy_rows<D>(kh, ks.l, Lk, Kc.data());
    copy_rows<D>(vh, vs.l, Lk, Vc.data());
    for (int i0 = 0; i0 < Lq; i0 += BQ) {
      const int rows = std::min(BQ, Lq - i0);
      // QT[d][r] = scale * log2(e) * q[i0 + r][d], zero for r >= rows.
      copy_rows<D>(qh + i0 * qs.l, qs.l, rows, Qc.data());
      pack_transposed<D>(Qc.data(), rows, scale * LOG2E, QT.data());
      // The next tile's rows are far apart (a row per head stride): fetch them while this one runs.
      for (int r = 0; r < std::min(BQ, Lq - i0 - BQ); ++r)
        for (int d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(qh + (i0 + BQ + r) * qs.l + d), _MM_HINT_T0);
      __m512 m[4], l[4];
      __mmask16 row_ok[4];
      for (int g = 0; g < 4; ++g) {
        m[g] = _mm512_set1_ps(NEG_INF);
        l[g] = _mm512_setzero_ps();
        row_ok[g] = lanes_below(rows - 16 * g);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int kend = causal ? std::min(Lk, i0 + rows) : Lk;
      for (int j0 = 0; j0 < kend; j0 += BK) {
        const int cols = std::min(BK, kend - j0);
        tile_abt<D>(Kc.data() + j0 * D, QT.data(), BQ, ST.data(), cols);
        // Key c is visible to row r when r < rows and (not causal or i0 + r >= j0 + c). Tiles
        // wholly visible (all but the diagonal and the last) skip the masks.
        auto softmax_tile = [&](auto masked) {
          constexpr bool kMasked = decltype(masked)::value;
          auto visible = [&](int c, int g) -> __mmask16 {
            if (!kMasked) return 0xFFFF;
            return causal ? static_cast<__mmask16>(row_ok[g] & lanes_from(j0 + c - i0 - 16 * g)) : row_ok[g];
          };
          __m512 mx[4] = {m[0], m[1], m[2], m[3]};
          for (int c = 0; c < cols; ++c)
            for (int g = 0; g < 4; ++g)
              mx[g] = _mm512_mask_max_ps(mx[g], visible(c, g), mx[g], _mm512_loadu_ps(ST.data() + c * BQ + 16 * g));
          __m512 base[4];
          for (int g = 0; g < 4; ++g) {
            // Rows that have seen nothing yet keep -inf; subtract 0 there instead of -inf.
            const __mmask16 seen = _mm512_cmp_ps_mask(mx[g], _mm512_set1_ps(NEG_INF), _CMP_NEQ_OQ);
            base[g] = _mm512_maskz_mov_ps(seen, mx[g]);
            const __m512 a = exp2_512(_mm512_sub_ps(m[g], base[g]));
            _mm512_storeu_ps(alpha.data() + 16 * g, a);
            l[g] = _mm512_mul_ps(l[g], a);
            m[g] = mx[g];
          }
          for (int c = 0; c < cols; ++c)
            for (int g = 0; g < 4; ++g) {
              float* s = ST.data() + c * BQ + 16 * g;
              __m512 p = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s), base[g]));
              if (kMasked) p = _mm512_maskz_mov_ps(visible(c, g), p);
              _mm512_storeu_ps(s, p);
              l[g] = _mm512_add_ps(l[g], p);
            }
        };
        const bool whole = rows == BQ && (!causal || j0 + cols - 1 <= i0);
        if (whole) softmax_tile(std::false_type{});
        else softmax_tile(std::true_type{});
        for (int r = 0; r < rows; ++r)
          if (alpha[r] != 1.0f) {
            const __m512 av = _mm512_set1_ps(alpha[r]);
            for (int d = 0; d < D; d += 16)
              _mm512_storeu_ps(acc.data() + r * D + d, _mm512_mul_ps(av, _mm512_loadu_ps(acc.data() + r * D + d)));
          }
        // acc[r][:] += sum_c P^T[c][r] V[j0 + c][:]
        tile_acc<D>(ST.data(), 1, BQ, Vc.data() + j0 * D, D, acc.data(), D, rows, cols);
      }
      for (int g = 0; g < 4; ++g) {
        _mm512_storeu_ps(m_out.data() + 16 * g, m[g]);
        _mm512_storeu_ps(l_out.data() + 16 * g, l[g]);
      }
      for (int r = 0; r < rows; ++r) {
        float* out = oh + (i0 + r) * os.l;
        if (l_out[r] > 0.0f) {
          const __m512 inv = _mm512_set1_ps(1.0f / l_out[r]);
          for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(out + d, _mm512_mul_ps(inv, _mm512_loadu_ps(acc.data() + r * D + d)));
          lh[(i0 + r) * ls.l] = m_out[r] * LN2 + std::log(l_out[r]);
        } else {  // a row that sees no key
          std::memset(out, 0, sizeof(float) * D);
          lh[(i0 + r) * ls.l] = NEG_INF;
        }
      }
    }
  });
}

template <int D>
void backward(const float* dout, Strides gs, const float* q, Strides qs, const float* k, Strides ks,
              const float* v, Strides vs, const float* o, Strides os, const float* lse, Strides ls,
              float* dq, Strides dqs, float* dk, Strides dks, float* dv, Strides dvs, int B, int Hq,
              int Hkv, int Lq, int Lk, bool causal, float scale, int threads) {
  const int64_t ldt = round_up(Lk, BK);
  const int rep = Hq / Hkv;
  // Each task is one KV head of one sample with all the query heads that share it, so that its
  // dK and dV have a single writer.
  parallel_for(B * Hkv, threads, [&](int64_t task, int) {
    const int b = task / Hkv, hk = task % Hkv;
    thread_local std::vector<float> Kc, KT, Vc, VT, dK, dV, Qs, G, Dr, dQ, S, dP, L;
    for (auto* buf : {&Kc, &KT, &Vc, &VT, &dK, &dV}) buf->resize(D * ldt);
    Qs.resize(static_cast<size_t>(Lq) * D);
    G.resize(static_cast<size_t>(Lq) * D);
    dQ.resize(static_cast<size_t>(Lq) * D);
    Dr.resize(Lq);
    L.resize(Lq);
    S.resize(BQ * BK);
    dP.resize(BQ * BK);
    const float* kh = k + b * ks.b + hk * ks.h;
    const float* vh = v + b * vs.b + hk * vs.h;
    float* dkh = dk + b * dks.b + hk * dks.h;
    float* dvh = dv + b * dvs.b + hk * dvs.h;
    std::fill(dK.begin(), dK.end(), 0.0f);
    std::fill(dV.begin(), dV.end(), 0.0f);
    pack_head<D>(kh, ks.l, Lk, Kc.data(), KT.data());
    pack_head<D>(vh, vs.l, Lk, Vc.data(), VT.data());
    // Scores in log2 units, as in the forward: Qs = scale * log2(e) * q, P = 2^(S - lse log2(e)).
    const __m512 qscale = _mm512_set1_ps(scale * LOG2E);
    for (int h = hk * rep; h < (hk + 1) * rep; ++h) {
      const float* qh = q + b * qs.b + h * qs.h;
      const float* gh = dout + b * gs.b + h * gs.h;
      const float* oh = o + b * os.b + h * os.h;
      const float* lh = lse + b * ls.b + h * ls.h;
      for (int i = 0; i < Lq; ++i) {
        if (i + 16 < Lq)  // rows a head stride apart: see copy_rows
          for (int d = 0; d < D; d += 16)
            for (const float* t : {gh + (i + 16) * gs.l, qh + (i + 16) * qs.l, oh + (i + 16) * os.l})
              _mm_prefetch(reinterpret_cast<const char*>(t + d), _MM_HINT_T0);
        __m512 dot = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
          const __m512 g = _mm512_loadu_ps(gh + i * gs.l + d);
          _mm512_storeu_ps(G.data() + i * D + d, g);
          _mm512_storeu_ps(Qs.data() + i * D + d, _mm512_mul_ps(qscale, _mm512_loadu_ps(qh + i * qs.l + d)));
          dot = _mm512_fmadd_ps(g, _mm512_loadu_ps(oh + i * os.l + d), dot);
        }
        Dr[i] = _mm512_reduce_add_ps(dot);
        L[i] = lh[i * ls.l] * LOG2E;
      }
      std::fill(dQ.begin(), dQ.end(), 0.0f);
      for (int j0 = 0; j0 < Lk; j0 += BK) {
        const int cols = std::min(BK, Lk - j0);
        const int istart = causal ? j0 / BQ * BQ : 0;
        for (int i0 = istart; i0 < Lq; i0 += BQ) {
          const int rows = std::min(BQ, Lq - i0);
          tile_abt<D>(Qs.data() + i0 * D, KT.data() + j0 * D, BK, S.data(), rows);
          tile_abt<D>(G.data() + i0 * D, VT.data() + j0 * D, BK, dP.data(), rows);
          // P = 2^(S - lse) where visible, 0 elsewhere; dS = P * (dP - D_r). Whole tiles (all but
          // the diagonal and the edges) skip the masks.
          auto softmax_rows = [&](auto masked) {
            constexpr bool kMasked = decltype(masked)::value;
            for (int r = 0; r < rows; ++r) {
              float* s = S.data() + r * BK;
              float* dp = dP.data() + r * BK;
              const int visible = !kMasked ? BK : causal ? std::min(cols, i0 + r - j0 + 1) : cols;
              const float lse_r = L[i0 + r];
              if (visible <= 0 || lse_r == NEG_INF) {
                std::memset(s, 0, sizeof(float) * BK);
                std::memset(dp, 0, sizeof(float) * BK);
                continue;
              }
              const __m512 lv = _mm512_set1_ps(lse_r), dv_r = _mm512_set1_ps(Dr[i0 + r]);
              for (int v4 = 0; v4 < 4; ++v4) {
                __m512 p = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * v4), lv));
                if (kMasked) p = _mm512_maskz_mov_ps(lanes_below(visible - 16 * v4), p);
                _mm512_storeu_ps(s + 16 * v4, p);
                _mm512_storeu_ps(dp + 16 * v4, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + 16 * v4), dv_r)));
              }
            }
          };
          if (rows == BQ && cols == BK && (!causal || i0 >= j0 + BK)) softmax_rows(std::false_type{});
          else softmax_rows(std::true_type{});
          // dV_j += P^T dO_i ; dK_j += dS^T Qs_i ; dQ_i += dS K_j (dK and dQ scaled at the end)
          tile_acc<D>(S.data(), 1, BK, G.data() + i0 * D, D, dV.data() + j0 * D, D, cols, rows);
          tile_acc<D>(dP.data(), 1, BK, Qs.data() + i0 * D, D, dK.data() + j0 * D, D, cols, rows);
          tile_acc<D>(dP.data(), BK, 1, Kc.data() + j0 * D, D, dQ.data() + i0 * D, D, rows, cols);
        }
      }
      store_rows<D>(dQ.data(), Lq, scale, dq + b * dqs.b + h * dqs.h, dqs.l);
    }
    store_rows<D>(dK.data(), Lk, LN2, dkh, dks.l);  // Qs carried a factor log2(e)
    store_rows<D>(dV.data(), Lk, 1.0f, dvh, dvs.l);
  });
}

Strides strides(const int64_t* s) { return Strides{s[0], s[1], s[2]}; }

}  // namespace

#define LOOM_HEAD_DIMS(X) X(16) X(32) X(48) X(64) X(80) X(96) X(128) X(256)

extern "C" {

// Returns 0 on success, 1 when head_dim has no compiled kernel.
int loom_attention_forward(int head_dim, const float* q, const int64_t* qs, const float* k,
                           const int64_t* ks, const float* v, const int64_t* vs, float* o,
                           const int64_t* os, float* lse, const int64_t* ls, int B, int Hq, int Hkv,
                           int Lq, int Lk, int causal, float scale, int threads) {
  switch (head_dim) {
#define CASE(DIM)                                                                                  \
  case DIM:                                                                                        \
    forward<DIM>(q, strides(qs), k, strides(ks), v, strides(vs), o, strides(os), lse, strides(ls), \
                 B, Hq, Hkv, Lq, Lk, causal != 0, scale, threads);                                 \
    return 0;
    LOOM_HEAD_DIMS(CASE)
#undef CASE
    default:
      return 1;
  }
}

int loom_attention_backward(int head_dim, const float* dout, const int64_t* gs, const float* q,
                            const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                            const int64_t* vs, const float* o, const int64_t* os, const float* lse,
                            const int64_t* ls, float* dq, const int64_t* dqs, float* dk,
                            const int64_t* dks, float* dv, const int64_t* dvs, int B, int Hq,
                            int Hkv, int Lq, int Lk, int causal, float scale, int threads) {
  switch (head_dim) {
#define CASE(DIM)                                                                                \
  case DIM:                                                                                      \
    backward<DIM>(dout, strides(gs), q, strides(qs), k, strides(ks), v, strides(vs), o,          \
                  strides(os), lse, strides(ls), dq, strides(dqs), dk, strides(dks), dv,         \
                  strides(dvs), B, Hq, Hkv, Lq, Lk, causal != 0, scale, threads);               \
    return 0;
    LOOM_HEAD_DIMS(CASE)
#undef CASE
    default:
      return 1;
  }
}

}  // extern "C"
