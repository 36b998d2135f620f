// Few-row products with a Linear weight for CPU decoding: out[r, o] = sum_i w[o, i] x[r, i].
//
// A decoding pass multiplies 1-8 activation rows by every weight of the model.  At that width
// the pass is bound by reading the weights from memory, so each weight row is read once and
// multiplied with all rows of the pass while it sits in registers/L1: a pass of n tokens then
// streams the weights once, like a pass of one.  The float32 path blocks O = 3 output rows at a
// time (O weight vectors and the N activation vectors of one chunk give O * N fused multiply-adds
// for O + N loads) and asks for the next block's rows one block ahead *into L2*: with 8 rows the
// multiply-adds alone take ~13 ms of a ~15 ms weight stream on 2 cores, and only a stream that
// runs ahead of them overlaps the two (measured on Zen 4, n = 8: 28 ms without the L2 prefetch
// or with it into L1, where it evicts the activations; 18 ms with it).  Part of mtp-lm
// (mtp_torch.decoding.native).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mtp {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kGrain = 32;  // output rows per parallel task
// Blocks ahead that a packed reader asks for: a packed block of 3 rows is a fifth of a float32
// one's bytes, so one block ahead left too little lead (the default's 211 products, one row:
// 8.3 ms one block ahead, 7.1 ms four or eight ahead; 7 rows unchanged; Xeon, AVX-512).
constexpr int64_t kPackedAhead = 4;

// One weight of a multi-weight product: out[r * stride + o] for o < rows.  With a mask-gated
// adapter (a, b), the gated rows m also get ``scale * B (A x[m])`` (forward.h).
//
// The adapter may be stored in float16 when every value is a float16 number (a delta shipped in
// float16 loads as such): the update reads half the bytes and computes with the same float32
// values, so its results are bitwise those of the float32 copy.
template <typename T>
struct Segment {
  const T* weight;       // (rows, in), contiguous
  T* out;                // row r of the result starts at out + r * stride
  int64_t rows;
  int64_t stride;
  const T* a = nullptr;  // adapter A: (rank, in); nullptr: none
  const T* b = nullptr;  // adapter B: (rows, rank)
  int64_t rank = 0;
  double scale = 0.0;
  const uint16_t* ah = nullptr;  // or A and B as float16 bits (float32 models; a, b unset)
  const uint16_t* bh = nullptr;
  // The same weights packed (float32 models, in % 32 == 0; see Q4Rows / Q8Rows): q4 (Q4_1) or
  // q8 (Q8_0) with their per-block scales ``qs``.  ``weight`` stays for ATen's wide products.
  const uint8_t* q4 = nullptr;
  const int8_t* q8 = nullptr;
  const float* qs = nullptr;
  bool adapted() const { return a != nullptr || ah != nullptr; }
};

// ``sg`` (no adapter) whose leading ``packed`` rows are packed as ``q4``/``q8``/``qs`` say, as
// two segments: those rows packed and the rest in float32 (a row added after the quantization,
// such as a new token's output row).  A row's bits do not depend on the segment or block it
// falls in (one reduction tree), so the split changes no result.
template <typename T>
std::vector<Segment<T>> split_packed(const Segment<T>& sg, int64_t packed, int64_t in) {
  if (packed >= sg.rows) return {sg};
  Segment<T> lead = sg;
  lead.rows = packed;
  return {lead, {sg.weight + packed * in, sg.out + packed, sg.rows - packed, sg.stride}};
}

inline float half_value(uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// ``count`` float16 values as float32 (exact: every float16 is a float32).
inline void widen(const uint16_t* from, float* to, int64_t count) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX512F__)
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(to + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + i))));
#elif defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(to + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
#endif
  for (; i < count; ++i) to[i] = half_value(from[i]);
}

template <typename T>
void widen(const uint16_t* from, T* to, int64_t count) {  // float64 models
  for (int64_t i = 0; i < count; ++i) to[i] = static_cast<T>(half_value(from[i]));
}

// A segment's adapter update at the gated rows, for the output rows a task computes: row r of
// the product (r < n) gets sum_j b[o, j] * low[slot[r], j] when slot[r] >= 0, where ``low``
// already holds ``scale * A x`` of the gated rows.
template <typename T>
struct Fold {
  const T* b = nullptr;
  const uint16_t* bh = nullptr;  // B as float16 bits instead (float32 only)
  const T* low = nullptr;
  int8_t slot[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
  int64_t rank = 0;
};

// The generic update (any type, any rank): a dot product per (output row, gated row).
template <typename T>
void fold_rows(const Fold<T>& f, T* out, int64_t n, int64_t b, int64_t e, int64_t stride) {
  for (int64_t r = 0; r < n; ++r) {
    if (f.slot[r] < 0) continue;
    const T* low = f.low + f.slot[r] * f.rank;
    std::vector<T> wide(f.bh != nullptr ? f.rank : 0);
    for (int64_t o = b; o < e; ++o) {
      const T* row = f.b + o * f.rank;
      if (f.bh != nullptr) {  // widened first: the same loop below, so the same rounding
        widen(f.bh + o * f.rank, wide.data(), f.rank);
        row = wide.data();
      }
      T dot = 0;
      for (int64_t j = 0; j < f.rank; ++j) dot += row[j] * low[j];
      out[r * stride + o] += dot;
    }
  }
}

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

#if (defined(__AVX512F__) || defined(__AVX2__)) && defined(__F16C__)
#define MTP_HAVE_SIMD 1
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vload_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
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
constexpr int kRegisters = 16;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vload_half(const uint16_t* p) {  // F16C: on every AVX2 CPU of this kind
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m128 vsum4(Vec a, Vec b, Vec c, Vec d) {
  const Vec ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const Vec cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const Vec abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

// Where a product's weights come from.  A reader hands the kernel lanes-wide vectors of a weight
// row's float32 values and asks for rows ahead into L2; every reader gives the same float32
// values for the same weights, so the products are bitwise the same whichever one is used.
//
// - DenseRows: float32 weights, or float16 bits (adapter A stored in float16, read without a
//   widened copy).
// - Q4Rows / Q8Rows: weights whose every block of 32 values along a row is exactly
//   ``d * q + m`` with q in 0..15 (GGUF Q4_1) or ``d * q`` with q in -128..127 (Q8_0), d and m
//   float16 numbers: what a model dequantized from such a GGUF file holds.  They are stored as
//   the 4- or 8-bit q and float32 (d, m) per block (0.75 or 1.125 bytes a weight instead of 4)
//   and expanded in registers: d * q is exact in float32 (11 by at most 8 significant bits), so
//   ``fma(d, q, m)`` rounds once, as the dequantization's ``d * q + m`` did, and every value is
//   the stored float32 weight's (mtp_torch.decoding.packing checks each block when it packs).
//   A one-token pass then streams ~100 MB of the 135M default instead of ~540 MB.
inline Vec vload_w(const float* p) { return vload(p); }
inline Vec vload_w(const uint16_t* p) { return vload_half(p); }
inline float scalar_w(float v) { return v; }
inline float scalar_w(uint16_t v) { return half_value(v); }

template <typename W>
struct DenseRows {
  const W* w;
  int64_t in;
  static constexpr int kChunks = 1;  // lanes-wide chunks per fetch
  struct Row {
    const W* p;
    const W* fetch(int64_t i) const { return p + i; }
    Vec chunk(const W* f, int) const { return vload_w(f); }
    float scalar(int64_t i) const { return scalar_w(p[i]); }
    // Into L2: the lines that values [i, i + count) of the row ``ahead`` rows on occupy.
    void prefetch(int64_t i, int64_t count, int64_t ahead_values) const {
      for (int64_t line = 0; line < count; line += 64 / int64_t(sizeof(W)))
        _mm_prefetch(reinterpret_cast<const char*>(p + ahead_values + i + line), _MM_HINT_T1);
    }
  };
  Row row(int64_t o) const { return {w + o * in}; }
};

#if defined(__AVX512F__)
inline __m512i widen_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512i widen_i8(const int8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec to_float(__m512i v) { return _mm512_cvtepi32_ps(v); }
#else
inline __m256i widen_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i widen_i8(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline Vec to_float(__m256i v) { return _mm256_cvtepi32_ps(v); }
#endif

// Q4_1: per row, in / 2 bytes of q (byte j of a block holds element j in its low nibble and
// element j + 16 in its high one, GGUF's order) and in / 32 pairs (d, m).
struct Q4Rows {
  const uint8_t* q;
  const float* dm;
  int64_t in;
  static constexpr int kChunks = 32 / kLanes;  // a fetch is one block of 32 values
#if defined(__AVX512F__)
  struct Fetched {
    __m512i bytes;  // the block's 16 bytes, one a lane
    Vec table;      // the block's 16 values d * k + m, k = 0..15
  };
#else
  struct Fetched {
    const uint8_t* bytes;
    const float* dm;
  };
#endif
  struct Row {
    const uint8_t* q;
    const float* dm;
    Fetched fetch(int64_t i) const {
      const int64_t b = i >> 5;
      Fetched f;
#if defined(__AVX512F__)
      f.bytes = widen_u8(q + b * 16);
      const Vec k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      f.table = vfma(vset1(dm[2 * b]), k, vset1(dm[2 * b + 1]));
#else
      f.bytes = q + b * 16;
      f.dm = dm + 2 * b;
#endif
      return f;
    }
    // Values [c * kLanes, (c + 1) * kLanes) of the block: the low nibbles of bytes
    // (c * kLanes) % 16 on for the first 16 values, the high ones for the rest.
    Vec chunk(const Fetched& f, int c) const {
#if defined(__AVX512F__)
      // vpermps reads the low 4 bits of each index: the low nibble, or the high one shifted.
      const __m512i v = c == 0 ? f.bytes : _mm512_srli_epi32(f.bytes, 4);
      return _mm512_permutexvar_ps(v, f.table);
#else
      __m256i v = widen_u8(f.bytes + (c & 1) * 8);
      if (c >= 2) v = _mm256_srli_epi32(v, 4);
      v = _mm256_and_si256(v, _mm256_set1_epi32(15));
      return vfma(vset1(f.dm[0]), to_float(v), vset1(f.dm[1]));
#endif
    }
    // i: a multiple of 32 (one fetch); a line holds the q of 128 values, the (d, m) of 256.
    void prefetch(int64_t i, int64_t, int64_t ahead_values) const {
      ahead_values *= kPackedAhead;
      if ((i & 127) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(q + (ahead_values + i) / 2), _MM_HINT_T1);
      if ((i & 255) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(dm + (ahead_values + i) / 16), _MM_HINT_T1);
    }
    float scalar(int64_t) const { return 0.f; }  // never: packed rows have in % 32 == 0
  };
  Row row(int64_t o) const { return {q + o * (in / 2), dm + o * (in / 16)}; }
};

// Q8_0: per row, in bytes of q and in / 32 scales d.
struct Q8Rows {
  const int8_t* q;
  const float* d;
  int64_t in;
  static constexpr int kChunks = 32 / kLanes;
  struct Fetched {
    const int8_t* q;
    const float* d;
  };
  struct Row {
    const int8_t* q;
    const float* d;
    Fetched fetch(int64_t i) const { return {q + i, d + (i >> 5)}; }
    Vec chunk(const Fetched& f, int c) const {
      return vmul(vset1(f.d[0]), to_float(widen_i8(f.q + c * kLanes)));
    }
    // i: a multiple of 32; a line holds the q of 64 values, the d of 512.
    void prefetch(int64_t i, int64_t, int64_t ahead_values) const {
      ahead_values *= kPackedAhead;
      if ((i & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(q + ahead_values + i), _MM_HINT_T1);
      if ((i & 511) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(d + (ahead_values + i) / 32), _MM_HINT_T1);
    }
    float scalar(int64_t) const { return 0.f; }  // never: packed rows have in % 32 == 0
  };
  Row row(int64_t o) const { return {q + o * in, d + o * (in / 32)}; }
};

// O output rows starting at o, N activation rows.  Each step fetches what the reader needs for
// R::kChunks lanes-wide chunks of the O weight rows (a packed block of 32 values: its bytes and
// scales once), then runs the chunks in order, so every sum takes its chunks in the same order
// whatever the reader: the same bits.
// Prefetch: ask for the next block's rows, one block ahead, into L2 (not L1: the activation rows
// live there, and a prefetch into L1 evicted them: measured 1.5x slower at 4-8 rows).
// fold: the adapter update (rank a multiple of kLanes), added to the lanes of the gated rows'
// sums before they are reduced: one multiply-add per (output row, gated row), B read with W.
template <int N, int O, bool Prefetch = true, typename R>
inline void block_f32(const R& rd, const float* x, float* out, int64_t in, int64_t o,
                      int64_t stride, const Fold<float>* fold = nullptr) {
  constexpr int C = R::kChunks;
  constexpr int64_t step = int64_t(kLanes) * C;
  const int64_t body = in - in % step;
  Vec acc[O][N];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < N; ++r) acc[a][r] = vzero();
  typename R::Row rows[O];
  for (int a = 0; a < O; ++a) rows[a] = rd.row(o + a);
  for (int64_t i = 0; i < body; i += step) {
    if (Prefetch)
      for (int a = 0; a < O; ++a) rows[a].prefetch(i, step, O * in);
    decltype(rows[0].fetch(0)) fetched[O];
    for (int a = 0; a < O; ++a) fetched[a] = rows[a].fetch(i);
    for (int c = 0; c < C; ++c) {
      Vec xv[N];
      for (int r = 0; r < N; ++r) xv[r] = vload(x + r * in + i + c * kLanes);
      for (int a = 0; a < O; ++a) {
        const Vec wv = rows[a].chunk(fetched[a], c);
        for (int r = 0; r < N; ++r) acc[a][r] = vfma(wv, xv[r], acc[a][r]);
      }
    }
  }
  constexpr int K = O * N;
  Vec t[K];
  float sums[K + 3];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < N; ++r) t[a * N + r] = acc[a][r];
  if (fold != nullptr) {
    // Each lanes-wide chunk of B's rows is loaded once for all gated rows, and each chunk of the
    // gated rows' ``low`` once for all O output rows; every sum still takes its chunks in order.
    const float* low[N];
    for (int r = 0; r < N; ++r)
      low[r] = fold->slot[r] < 0 ? nullptr : fold->low + fold->slot[r] * fold->rank;
    for (int64_t c = 0; c < fold->rank; c += kLanes) {
      Vec lv[N];
      for (int r = 0; r < N; ++r)
        if (low[r] != nullptr) lv[r] = vload(low[r] + c);
      for (int a = 0; a < O; ++a) {
        const Vec bv = fold->bh != nullptr ? vload_half(fold->bh + (o + a) * fold->rank + c)
                                           : vload(fold->b + (o + a) * fold->rank + c);
        for (int r = 0; r < N; ++r)
          if (low[r] != nullptr) t[a * N + r] = vfma(bv, lv[r], t[a * N + r]);
      }
    }
  }
  int k = 0;
  for (; k + 4 <= K; k += 4) _mm_storeu_ps(sums + k, vsum4(t[k], t[k + 1], t[k + 2], t[k + 3]));
  // The rest through the same tree, so that a sum's bits do not depend on where it falls in
  // the block: a row's products are then the same bits at every pass width (and a verify
  // pass's logits those of one-token passes).
  for (; k < K; ++k) sums[k] = _mm_cvtss_f32(vsum4(t[k], t[k], t[k], t[k]));
  for (int a = 0; a < O; ++a) {
    for (int r = 0; r < N; ++r) {
      float s = sums[a * N + r];
      for (int64_t i = body; i < in; ++i) s += rows[a].scalar(i) * x[r * in + i];
      out[r * stride + o + a] = s;
    }
  }
}

// Weight rows per block for N activation rows.  Three, so that O * N accumulators, O weight
// vectors and an activation vector fit the 32 AVX-512 registers up to 8 rows.  With the 16 AVX2
// registers, 5-6 rows take two (3 * 6 accumulators spill; splitting them 3 + 2 or 3 + 3 measured
// slower); 7-8 rows go through each 3-row block twice, 4 activation rows and then the rest
// (rows_f32_split): one thread, 7 rows of gate/up's weights, 0.52 -> 0.35 ms (43% -> 65% of
// the FMA peak, AVX2 build on Zen 4); the model's 7+0 pass 27.9 -> 26.4 ms, same bits.
// A packed reader (Chunks > 1) also holds a block's bytes and table per weight row: at 6-8 rows
// two weight rows a block, or the accumulators spill (the default's products, 7 rows, AVX-512:
// 14.8 -> 13.4 ms).
template <int N, int Chunks = 1>
constexpr int block_rows() {
  if (kRegisters >= 32) return (Chunks > 1 && N >= 6) ? 2 : 3;
  return (N == 5 || N == 6) ? 2 : 3;
}

// Output rows [b, e): blocks of O rows, then single rows.
template <int N, typename R>
void rows_f32(const R& rd, const float* x, float* out, int64_t in, int64_t b, int64_t e,
              int64_t stride, const Fold<float>* fold) {
  constexpr int O = block_rows<N, R::kChunks>();
  int64_t o = b;
  for (; o + O <= e; o += O) block_f32<N, O, true>(rd, x, out, in, o, stride, fold);
  for (; o < e; ++o) block_f32<N, 1, true>(rd, x, out, in, o, stride, fold);
}

// 7-8 rows with 16 registers: each block of 3 weight rows twice, for the first 4 activation rows
// and then the rest (12 and 9-12 accumulators fit; 21-24 spilled), the second time from L1.
template <int N, typename R>
void rows_f32_split(const R& rd, const float* x, float* out, int64_t in, int64_t b,
                    int64_t e, int64_t stride, const Fold<float>* fold) {
  constexpr int H = 4, Rest = N - H;
  Fold<float> rest;
  const Fold<float>* fold_rest = nullptr;
  if (fold != nullptr) {
    rest = *fold;
    for (int r = 0; r < 8; ++r) rest.slot[r] = r + H < 8 ? fold->slot[r + H] : -1;
    fold_rest = &rest;
  }
  int64_t o = b;
  for (; o + 3 <= e; o += 3) {
    block_f32<H, 3, true>(rd, x, out, in, o, stride, fold);
    block_f32<Rest, 3, false>(rd, x + H * in, out + H * stride, in, o, stride, fold_rest);
  }
  for (; o < e; ++o) {
    block_f32<H, 1, true>(rd, x, out, in, o, stride, fold);
    block_f32<Rest, 1, false>(rd, x + H * in, out + H * stride, in, o, stride, fold_rest);
  }
}

template <typename R>
void rows_f32_n(const R& rd, const float* x, float* out, int64_t in, int64_t n, int64_t b,
                int64_t e, int64_t stride, const Fold<float>* fold) {
  switch (n) {
    case 1: rows_f32<1>(rd, x, out, in, b, e, stride, fold); break;
    case 2: rows_f32<2>(rd, x, out, in, b, e, stride, fold); break;
    case 3: rows_f32<3>(rd, x, out, in, b, e, stride, fold); break;
    case 4: rows_f32<4>(rd, x, out, in, b, e, stride, fold); break;
    case 5: rows_f32<5>(rd, x, out, in, b, e, stride, fold); break;
    case 6: rows_f32<6>(rd, x, out, in, b, e, stride, fold); break;
    case 7:
      if (kRegisters >= 32) rows_f32<7>(rd, x, out, in, b, e, stride, fold);
      else rows_f32_split<7>(rd, x, out, in, b, e, stride, fold);
      break;
    default:
      if (kRegisters >= 32) rows_f32<8>(rd, x, out, in, b, e, stride, fold);
      else rows_f32_split<8>(rd, x, out, in, b, e, stride, fold);
      break;
  }
}
#endif

// Output rows [b, e) of n rows' product, with the adapter update where ``fold`` is given.
// ``sg``: the segment, when its weights may be read packed.
template <typename T>
inline void rows_n(const T* w, const T* x, T* out, int64_t in, int64_t n, int64_t b, int64_t e,
                   int64_t stride, const Fold<T>* fold = nullptr,
                   const Segment<T>* sg = nullptr) {
#ifdef MTP_HAVE_SIMD
  if constexpr (std::is_same<T, float>::value) {
    const bool lanes = fold == nullptr || fold->rank % kLanes == 0;
    const Fold<float>* f = lanes ? fold : nullptr;
    if (sg != nullptr && sg->q4 != nullptr)
      rows_f32_n(Q4Rows{sg->q4, sg->qs, in}, x, out, in, n, b, e, stride, f);
    else if (sg != nullptr && sg->q8 != nullptr)
      rows_f32_n(Q8Rows{sg->q8, sg->qs, in}, x, out, in, n, b, e, stride, f);
    else
      rows_f32_n(DenseRows<float>{w, in}, x, out, in, n, b, e, stride, f);
    if (!lanes) fold_rows<T>(*fold, out, n, b, e, stride);
    return;
  }
#endif
  rows_generic_n<T>(w, x, out, in, n, b, e, stride);
  if (fold != nullptr) fold_rows<T>(*fold, out, n, b, e, stride);
}

// scale * A x of the gated rows ``picked`` (ng, in) for A's rows [r0, r1), into low (ng, rank).
// A float16 A is read as such by the float32 kernel (vload_w); elsewhere it is widened into
// ``scratch`` first.  Either way the same values, so the same results.  Reading it directly
// rather than widening a copy first (which read A from memory, then wrote and re-read the copy)
// took the A phase of a 4+3 pass of the shipped default from ~1.1-1.3 to ~0.5-0.6 ms (Zen 4).
template <typename T>
void adapter_low(const Segment<T>& sg, const T* picked, int64_t ng, int64_t in, int64_t r0,
                 int64_t r1, T* low, std::vector<T>& scratch) {
  bool direct = false;
#ifdef MTP_HAVE_SIMD
  if constexpr (std::is_same<T, float>::value) {
    direct = sg.ah != nullptr;
    if (direct) rows_f32_n(DenseRows<uint16_t>{sg.ah, in}, picked, low, in, ng, r0, r1, sg.rank, nullptr);
  }
#endif
  if (!direct) {
    const T* a = sg.a;
    if (sg.ah != nullptr) {
      if (static_cast<int64_t>(scratch.size()) < sg.rank * in) scratch.resize(sg.rank * in);
      widen(sg.ah + r0 * in, scratch.data() + r0 * in, (r1 - r0) * in);
      a = scratch.data();
    }
    rows_n<T>(a, picked, low, in, ng, r0, r1, sg.rank);
  }
  for (int64_t m = 0; m < ng; ++m)
    for (int64_t r = r0; r < r1; ++r) low[m * sg.rank + r] *= static_cast<T>(sg.scale);
}

// The product of n <= kMaxRows rows x (n, in) with several weights sharing ``in`` (q, k and v;
// gate and up), in one parallel region over all their output rows, split as at::parallel_for
// splits them.  Adapters act at the ``gated`` rows only: ``scale * A x`` of those rows first,
// then B's update folded into the products (see block_f32), so the weights and B are read once.
// With several threads the two phases share one region: the threads split each A (its rows cut
// at the multiple of 6 nearest an even share, where the kernel's blocks of 2 or 3 rows fall as
// they do for the whole A, so the results are the same bits; rank 32 splits 18 + 14, where
// rounding down split it 12 + 20 and one thread waited ~0.4 ms a pass at the barrier), wait at a
// barrier, then run the products.  Each thread reading every A itself before its products cost
// ~1.5 ms a 135M pass (A read cold, 7 times a block, on the critical path; measured on Zen 4).
template <typename T>
void few_row_product(const T* x, int64_t n, int64_t in, const std::vector<Segment<T>>& segs,
                     const std::vector<int64_t>& gated = {}) {
  std::vector<int64_t> start(segs.size() + 1, 0);
  for (size_t s = 0; s < segs.size(); ++s) start[s + 1] = start[s] + segs[s].rows;
  const int64_t ng = static_cast<int64_t>(gated.size()), total = start.back();
  bool adapted = false;
  for (const auto& sg : segs) adapted = adapted || sg.adapted();
  std::vector<T> picked;
  std::vector<std::vector<T>> lows(segs.size());
  if (adapted && ng > 0) {
    picked.resize(ng * in);  // the gated rows, contiguous
    for (int64_t m = 0; m < ng; ++m) std::copy_n(x + gated[m] * in, in, picked.data() + m * in);
    for (size_t s = 0; s < segs.size(); ++s)
      if (segs[s].adapted()) lows[s].resize(ng * segs[s].rank);
  }
  auto products = [&](int64_t b, int64_t e) {
    for (size_t s = 0; s < segs.size(); ++s) {
      const int64_t lo = std::max(b, start[s]), hi = std::min(e, start[s + 1]);
      if (lo >= hi) continue;
      const Segment<T>& sg = segs[s];
      Fold<T> fold;
      if (!lows[s].empty()) {
        fold.b = sg.b;
        fold.bh = sg.bh;
        fold.low = lows[s].data();
        fold.rank = sg.rank;
        for (int64_t m = 0; m < ng; ++m) fold.slot[gated[m]] = static_cast<int8_t>(m);
      }
      rows_n<T>(sg.weight, x, sg.out, in, n, lo - start[s], hi - start[s], sg.stride,
                fold.low ? &fold : nullptr, &sg);
    }
  };
  if (picked.empty()) {
    at::parallel_for(0, total, kGrain, products);
    return;
  }
#ifdef _OPENMP
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (total + kGrain - 1) / kGrain);
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
      // Kept per thread across calls: a fresh vector zero-filled ~75-200 KB a product.
      static thread_local std::vector<T> scratch;
      for (size_t s = 0; s < segs.size(); ++s) {
        if (lows[s].empty()) continue;
        const int64_t rank = segs[s].rank;
        const int64_t r0 = t == 0 ? 0 : (rank * t / count + 3) / 6 * 6;
        const int64_t r1 = t + 1 == count ? rank : (rank * (t + 1) / count + 3) / 6 * 6;
        if (r0 < r1) adapter_low(segs[s], picked.data(), ng, in, r0, r1, lows[s].data(), scratch);
      }
#pragma omp barrier
      const int64_t chunk = (total + count - 1) / count, b = t * chunk;
      if (b < total) products(b, std::min(total, b + chunk));
    }
    return;
  }
#endif
  static thread_local std::vector<T> scratch;
  for (size_t s = 0; s < segs.size(); ++s)
    if (!lows[s].empty())
      adapter_low(segs[s], picked.data(), ng, in, 0, segs[s].rank, lows[s].data(), scratch);
  at::parallel_for(0, total, kGrain, products);
}

inline bool has_simd() {
#ifdef MTP_HAVE_SIMD
  return true;
#else
  return false;
#endif
}

}  // namespace mtp
