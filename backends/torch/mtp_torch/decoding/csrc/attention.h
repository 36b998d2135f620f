// Attention of a few queries over a cache, float32 with AVX2/AVX-512 (see forward.h's attend).
//
// Per query head and group of up to four queries (one parallel task each, so that a 7-token
// block's 18 tasks split evenly over 2 threads where its 9 heads split 5:4): the queries sit in
// registers while the keys stream past, their four scores against one key come from one key load
// and one transpose-and-add reduction (vsum4), the softmax runs a vectorised exp, and the
// weighted sum of values loads each value row once for the group.  Measured on Zen 4 (2 threads,
// 200 cached slots, 30 layers of 9 heads): 7 queries 1.8 -> 1.1 ms, 5 queries 1.7 -> 0.9 ms
// against one task per head reloading its queries per key.  Part of mtp-lm.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "products.h"

namespace mtp {

struct Shape {
  int64_t batch, width, hidden, heads, kv_heads, head_dim, intermediate, capacity, past;
  double eps, scaling;
};

#ifdef MTP_HAVE_SIMD
#if defined(__AVX512F__)
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec vfloor(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline Vec vpow2(Vec n) {  // 2^n for integral n in the normal range
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
#else
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec vfloor(Vec a) { return _mm256_floor_ps(a); }
inline Vec vpow2(Vec n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a); }
#endif

// exp(x) for x <= 0 (softmax after subtracting the maximum), within a few ulp: Cody-Waite range
// reduction by ln 2 and a degree-6 polynomial (the Cephes expf coefficients).
inline Vec vexp(Vec x) {
  x = vmax(x, vset1(-87.3f));
  x = vmin(x, vset1(88.0f));
  const Vec n = vfloor(vfma(x, vset1(1.44269504088896341f), vset1(0.5f)));
  x = vfma(n, vset1(-0.693359375f), x);
  x = vfma(n, vset1(2.12194440e-4f), x);
  Vec y = vset1(1.9875691500e-4f);
  y = vfma(y, x, vset1(1.3981999507e-3f));
  y = vfma(y, x, vset1(8.3334519073e-3f));
  y = vfma(y, x, vset1(4.1665795894e-2f));
  y = vfma(y, x, vset1(1.6666665459e-1f));
  y = vfma(y, x, vset1(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), vadd(x, vset1(1.0f)));
  return vmul(y, vpow2(n));
}

constexpr int kQueries = 4;  // queries sharing each key/value load
constexpr int kValueChunks = kRegisters >= 32 ? 4 : 2;  // head chunks summed per pass over values

// Queries [w0, w0 + nq) (nq <= kQueries) of one (row, query head): scores, softmax and values.
// The queries' chunks stay in registers while the keys stream past (up to kHeldChunks chunks
// a query; longer heads reload them per key).
constexpr int kHeldChunks = kRegisters >= 32 ? 4 : 2;

template <int C>
inline void scores_held(const float* const* query, const float* keys, float* score, int64_t nq,
                        int64_t last, int64_t slots, int64_t d, float scale) {
  Vec qv[kQueries][C];
  for (int i = 0; i < kQueries; ++i)
    for (int c = 0; c < C; ++c) qv[i][c] = i < nq ? vload(query[i] + c * kLanes) : vzero();
  for (int64_t j = 0; j <= last; ++j) {
    const float* kv = keys + j * d;
    Vec acc[kQueries] = {vzero(), vzero(), vzero(), vzero()};
    for (int c = 0; c < C; ++c) {
      const Vec kvec = vload(kv + c * kLanes);
      for (int i = 0; i < kQueries; ++i) acc[i] = vfma(qv[i][c], kvec, acc[i]);
    }
    float four[4];
    _mm_storeu_ps(four, vsum4(acc[0], acc[1], acc[2], acc[3]));
    for (int64_t i = 0; i < nq; ++i) score[i * slots + j] = four[i] * scale;
  }
}

inline void attend_head_f32(const float* q, const float* keys, const float* values,
                            const uint8_t* mask, float* out, const Shape& s, int64_t b, int64_t h,
                            int64_t w0, std::vector<float>& score) {
  const int64_t d = s.head_dim, chunks = d / kLanes, slots = s.past + s.width;
  const float scale = static_cast<float>(s.scaling), lowest = -std::numeric_limits<float>::infinity();
  const int64_t nq = std::min<int64_t>(kQueries, s.width - w0);
  const float* query[kQueries];
  for (int64_t i = 0; i < kQueries; ++i)
    query[i] = q + ((b * s.width + w0 + std::min(i, nq - 1)) * s.heads + h) * d;
  const int64_t last = s.past + w0 + nq - 1;  // the newest slot any of these queries sees
  if (chunks == kHeldChunks) {
    scores_held<kHeldChunks>(query, keys, score.data(), nq, last, slots, d, scale);
  } else {
    for (int64_t j = 0; j <= last; ++j) {
      const float* kv = keys + j * d;
      Vec acc[kQueries] = {vzero(), vzero(), vzero(), vzero()};
      for (int64_t c = 0; c < chunks; ++c) {
        const Vec kvec = vload(kv + c * kLanes);
        for (int64_t i = 0; i < nq; ++i) acc[i] = vfma(vload(query[i] + c * kLanes), kvec, acc[i]);
      }
      float four[4];
      _mm_storeu_ps(four, vsum4(acc[0], acc[1], acc[2], acc[3]));
      for (int64_t i = 0; i < nq; ++i) score[i * slots + j] = four[i] * scale;
    }
  }
  float inverse[kQueries] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < nq; ++i) {
    float* row = score.data() + i * slots;
    const int64_t last_i = s.past + w0 + i;
    float top = lowest;
    for (int64_t j = 0; j <= last_i; ++j)
      if (mask[j]) top = std::max(top, row[j]);
    if (top == lowest) {  // sees nothing (a padding slot): zeros, never read
      std::fill(row, row + slots, 0.f);
      continue;
    }
    for (int64_t j = 0; j <= last_i; ++j)
      if (!mask[j]) row[j] = lowest;
    // Over the slots this query sees only, so that which slots take the vector exp and which
    // the scalar one depends on the query's position, not on the pass width: a query gets the
    // same bits in a pass of any width (a verify pass's rows are one-token passes' rows).
    const int64_t seen = last_i + 1;
    std::fill(row + seen, row + slots, 0.f);
    const Vec vtop = vset1(top);
    int64_t j = 0;
    for (; j + kLanes <= seen; j += kLanes) vstore(row + j, vexp(vadd(vload(row + j), vmul(vtop, vset1(-1.f)))));
    for (; j < seen; ++j) row[j] = std::exp(row[j] - top);
    float total = 0.f;
    for (int64_t k = 0; k < seen; ++k) {
      if (row[k] < 1e-37f) row[k] = 0.f;  // masked slots: the clamped exp's floor, dropped
      total += row[k];
    }
    inverse[i] = 1.f / total;
  }
  // The weighted sum of values, kValueChunks lanes-wide chunks of the head at a time, so the
  // kQueries x kValueChunks sums stay in registers while each value row is loaded once.
  for (int64_t c0 = 0; c0 < chunks; c0 += kValueChunks) {
    const int64_t nc = std::min<int64_t>(kValueChunks, chunks - c0);
    Vec acc[kQueries][kValueChunks];
    for (int i = 0; i < kQueries; ++i)
      for (int c = 0; c < kValueChunks; ++c) acc[i][c] = vzero();
    for (int64_t j = 0; j <= last; ++j) {
      const float* vv = values + j * d + c0 * kLanes;
      Vec p[kQueries];
      for (int64_t i = 0; i < nq; ++i) p[i] = vset1(score[i * slots + j]);
      for (int64_t c = 0; c < nc; ++c) {
        const Vec v = vload(vv + c * kLanes);
        for (int64_t i = 0; i < nq; ++i) acc[i][c] = vfma(p[i], v, acc[i][c]);
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      float* o = out + ((b * s.width + w0 + i) * s.heads + h) * d + c0 * kLanes;
      const Vec inv = vset1(inverse[i]);
      for (int64_t c = 0; c < nc; ++c) vstore(o + c * kLanes, vmul(acc[i][c], inv));
    }
  }
}
#endif

// Whether attend_head_f32 serves this head size.
inline bool simd_attention(int64_t head_dim) {
#ifdef MTP_HAVE_SIMD
  return head_dim % kLanes == 0;
#else
  (void)head_dim;
  return false;
#endif
}

}  // namespace mtp
