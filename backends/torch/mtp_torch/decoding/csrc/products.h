// Few-row products with a Linear weight for CPU decoding: out[r, o] = sum_i w[o, i] x[r, i].
//
// A decoding pass multiplies 1-8 activation rows by every weight of the model.  At that width
// the pass is bound by reading the weights from memory, so each weight row is read once and
// multiplied with all rows of the pass while it sits in registers/L1: a pass of n tokens then
// streams the weights once, like a pass of one.  The float32 path blocks O output rows at a time
// (O weight vectors and the N activation vectors of one 16-float chunk give O * N fused
// multiply-adds for O + N loads), which keeps the loads, not the arithmetic, below the rate the
// weights arrive at.  Part of mtp-lm (mtp_torch.decoding.native).
#pragma once

#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mtp {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kGrain = 32;  // output rows per parallel task

// One weight of a multi-weight product: out[r * stride + o] for o < rows.
template <typename T>
struct Segment {
  const T* weight;       // (rows, in), contiguous
  T* out;                // row r of the result starts at out + r * stride
  int64_t rows;
  int64_t stride;
  const T* x = nullptr;  // this weight's own (n, in) input; nullptr: the product's
};

// Any floating type, any CPU: a plain dot product per (output row, activation row).
template <typename T, int N>
void rows_generic(const T* w, const T* x, T* out, int64_t in, int64_t b, int64_t e,
                  int64_t stride) {
  for (int64_t o = b; o < e; ++o) {
    const T* row = w + o * in;
    for (int r = 0; r < N; ++r) {
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < in; ++i) s += row[i] * x[r * in + i];
      out[r * stride + o] = s;
    }
  }
}

template <typename T>
void rows_generic_n(const T* w, const T* x, T* out, int64_t in, int64_t n, int64_t b, int64_t e,
                    int64_t stride) {
  switch (n) {
    case 1: rows_generic<T, 1>(w, x, out, in, b, e, stride); break;
    case 2: rows_generic<T, 2>(w, x, out, in, b, e, stride); break;
    case 3: rows_generic<T, 3>(w, x, out, in, b, e, stride); break;
    case 4: rows_generic<T, 4>(w, x, out, in, b, e, stride); break;
    case 5: rows_generic<T, 5>(w, x, out, in, b, e, stride); break;
    case 6: rows_generic<T, 6>(w, x, out, in, b, e, stride); break;
    case 7: rows_generic<T, 7>(w, x, out, in, b, e, stride); break;
    default: rows_generic<T, 8>(w, x, out, in, b, e, stride); break;
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
#define MTP_HAVE_SIMD 1
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 16;  // of 32 vector registers
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
// [sum(a), sum(b), sum(c), sum(d)]: one transpose-and-add tree instead of four reductions.
inline __m128 vsum4(Vec a, Vec b, Vec c, Vec d) {
  const Vec ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const Vec cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const Vec abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 8;  // of 16 vector registers
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline __m128 vsum4(Vec a, Vec b, Vec c, Vec d) {
  const Vec ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const Vec cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const Vec abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

// O output rows starting at o, N activation rows, U independent lanes-wide chunks per step;
// Prefetch: ask for the next block's rows one block ahead.
template <int N, int O, int U, bool Prefetch = true>
inline void block_f32(const float* w, const float* x, float* out, int64_t in, int64_t o,
                      int64_t stride) {
  constexpr int64_t step = int64_t(kLanes) * U;
  const int64_t body = in - in % step;
  Vec acc[O][N][U];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < N; ++r)
      for (int u = 0; u < U; ++u) acc[a][r][u] = vzero();
  const float* rows[O];
  for (int a = 0; a < O; ++a) rows[a] = w + (o + a) * in;
  for (int64_t i = 0; i < body; i += step) {
    // The next block's rows (contiguous after these), one block ahead of the loads: the stream
    // from memory overlaps the multiply-adds instead of waiting on the hardware prefetcher.
    if (Prefetch)
      for (int a = 0; a < O; ++a)
        for (int64_t line = 0; line < step; line += 16)  // 16 floats: one 64-byte line
          _mm_prefetch(reinterpret_cast<const char*>(rows[a] + O * in + i + line), _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      Vec xv[N];
      for (int r = 0; r < N; ++r) xv[r] = vload(x + r * in + i + u * kLanes);
      for (int a = 0; a < O; ++a) {
        const Vec wv = vload(rows[a] + i + u * kLanes);
        for (int r = 0; r < N; ++r) acc[a][r][u] = vfma(wv, xv[r], acc[a][r][u]);
      }
    }
  }
  constexpr int K = O * N;
  Vec t[K];
  float sums[K + 3];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < N; ++r) {
      t[a * N + r] = acc[a][r][0];
      for (int u = 1; u < U; ++u) t[a * N + r] = vadd(t[a * N + r], acc[a][r][u]);
    }
  int k = 0;
  for (; k + 4 <= K; k += 4) _mm_storeu_ps(sums + k, vsum4(t[k], t[k + 1], t[k + 2], t[k + 3]));
  for (; k < K; ++k) sums[k] = vsum(t[k]);
  for (int a = 0; a < O; ++a) {
    for (int r = 0; r < N; ++r) {
      float s = sums[a * N + r];
      for (int64_t i = body; i < in; ++i) s += rows[a][i] * x[r * in + i];
      out[r * stride + o + a] = s;
    }
  }
}

// Output rows [b, e).  Up to 3 activation rows, one weight row at a time with many independent
// accumulators streams at memory speed (measured: blocking and prefetching cost 10-20% there);
// from 4 rows on, blocks of O rows with the next block prefetched, then single rows.
template <int N>
void rows_f32(const float* w, const float* x, float* out, int64_t in, int64_t b, int64_t e,
              int64_t stride) {
  if constexpr (N <= 3) {
    constexpr int U = N >= 2 ? 4 : 8;
    for (int64_t o = b; o < e; ++o) block_f32<N, 1, U, false>(w, x, out, in, o, stride);
    return;
  }
  constexpr int O = kAccumulators / N >= 4 ? 4 : (kAccumulators / N >= 2 ? 2 : 1);
  constexpr int U = kAccumulators / (O * N) >= 2 ? 2 : 1;
  int64_t o = b;
  for (; o + O <= e; o += O) block_f32<N, O, U>(w, x, out, in, o, stride);
  for (; o < e; ++o) block_f32<N, 1, U>(w, x, out, in, o, stride);
}

inline void rows_f32_n(const float* w, const float* x, float* out, int64_t in, int64_t n,
                       int64_t b, int64_t e, int64_t stride) {
  switch (n) {
    case 1: rows_f32<1>(w, x, out, in, b, e, stride); break;
    case 2: rows_f32<2>(w, x, out, in, b, e, stride); break;
    case 3: rows_f32<3>(w, x, out, in, b, e, stride); break;
    case 4: rows_f32<4>(w, x, out, in, b, e, stride); break;
    case 5: rows_f32<5>(w, x, out, in, b, e, stride); break;
    case 6: rows_f32<6>(w, x, out, in, b, e, stride); break;
    case 7: rows_f32<7>(w, x, out, in, b, e, stride); break;
    default: rows_f32<8>(w, x, out, in, b, e, stride); break;
  }
}
#endif

template <typename T>
inline void rows_n(const T* w, const T* x, T* out, int64_t in, int64_t n, int64_t b, int64_t e,
                   int64_t stride) {
#ifdef MTP_HAVE_SIMD
  if constexpr (std::is_same<T, float>::value) {
    rows_f32_n(w, x, out, in, n, b, e, stride);
    return;
  }
#endif
  rows_generic_n<T>(w, x, out, in, n, b, e, stride);
}

// The product of n <= kMaxRows rows x (n, in) with several weights sharing ``in`` (q, k and v;
// gate and up), in one parallel region over all their output rows.
template <typename T>
void few_row_product(const T* x, int64_t n, int64_t in, const std::vector<Segment<T>>& segs) {
  std::vector<int64_t> start(segs.size() + 1, 0);
  for (size_t s = 0; s < segs.size(); ++s) start[s + 1] = start[s] + segs[s].rows;
  at::parallel_for(0, start.back(), kGrain, [&](int64_t b, int64_t e) {
    for (size_t s = 0; s < segs.size(); ++s) {
      const int64_t lo = std::max(b, start[s]), hi = std::min(e, start[s + 1]);
      if (lo >= hi) continue;
      rows_n<T>(segs[s].weight, segs[s].x ? segs[s].x : x, segs[s].out, in, n, lo - start[s],
                hi - start[s], segs[s].stride);
    }
  });
}

inline bool has_simd() {
#ifdef MTP_HAVE_SIMD
  return true;
#else
  return false;
#endif
}

}  // namespace mtp
