// The weight-first product of a few activation rows with a Linear weight, for CPU decoding.
//
// out[r, o] = sum_i w[o, i] * x[r, i] for r < n <= 8.  Each weight row is read from memory
// once and multiplied with every activation row while it sits in L1, so a pass of n tokens
// streams the weights once, like a pass of one: the cost of a decoding pass stays close to
// the time it takes to read the model, whatever n.  Part of mtp-lm (mtp_torch.decoding.native).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kGrain = 32;  // output rows per parallel task

// Any floating type, any CPU: a plain dot product per (output row, activation row).
template <typename T, int N>
void rows_generic(const T* w, const T* x, T* out, int64_t in, int64_t b, int64_t e, int64_t od) {
  for (int64_t o = b; o < e; ++o) {
    const T* row = w + o * in;
    for (int r = 0; r < N; ++r) {
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < in; ++i) s += row[i] * x[r * in + i];
      out[r * od + o] = s;
    }
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
#else
constexpr int kLanes = 8;
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
#endif

// float32 with FMA: N activation rows times U unrolled lanes-wide chunks of independent
// accumulators hide the FMA latency; from five rows on, the next-but-one weight row is
// prefetched so that loading it overlaps the (then compute-heavy) current row.
template <int N>
void rows_f32(const float* w, const float* x, float* out, int64_t in, int64_t b, int64_t e,
              int64_t od) {
  constexpr int U = N >= 8 ? 1 : (N >= 4 ? 2 : (N >= 2 ? 4 : 8));
  constexpr int64_t step = int64_t(kLanes) * U;
  const int64_t body = in - in % step;
  for (int64_t o = b; o < e; ++o) {
    const float* row = w + o * in;
    Vec acc[N][U];
    for (int r = 0; r < N; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = vzero();
    for (int64_t i = 0; i < body; i += step) {
      if (N >= 5) _mm_prefetch(reinterpret_cast<const char*>(row + 2 * in + i), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const Vec wv = vload(row + i + u * kLanes);
        for (int r = 0; r < N; ++r) acc[r][u] = vfma(wv, vload(x + r * in + i + u * kLanes), acc[r][u]);
      }
    }
    for (int r = 0; r < N; ++r) {
      Vec t = acc[r][0];
      for (int u = 1; u < U; ++u) t = vadd(t, acc[r][u]);
      float s = vsum(t);
      for (int64_t i = body; i < in; ++i) s += row[i] * x[r * in + i];
      out[r * od + o] = s;
    }
  }
}
#define MTP_HAVE_SIMD 1
#endif

template <typename T>
void run_generic(const T* w, const T* x, T* out, int64_t in, int64_t n, int64_t od) {
  at::parallel_for(0, od, kGrain, [&](int64_t b, int64_t e) {
    switch (n) {
      case 1: rows_generic<T, 1>(w, x, out, in, b, e, od); break;
      case 2: rows_generic<T, 2>(w, x, out, in, b, e, od); break;
      case 3: rows_generic<T, 3>(w, x, out, in, b, e, od); break;
      case 4: rows_generic<T, 4>(w, x, out, in, b, e, od); break;
      case 5: rows_generic<T, 5>(w, x, out, in, b, e, od); break;
      case 6: rows_generic<T, 6>(w, x, out, in, b, e, od); break;
      case 7: rows_generic<T, 7>(w, x, out, in, b, e, od); break;
      default: rows_generic<T, 8>(w, x, out, in, b, e, od); break;
    }
  });
}

void run_f32(const float* w, const float* x, float* out, int64_t in, int64_t n, int64_t od) {
#ifdef MTP_HAVE_SIMD
  at::parallel_for(0, od, kGrain, [&](int64_t b, int64_t e) {
    switch (n) {
      case 1: rows_f32<1>(w, x, out, in, b, e, od); break;
      case 2: rows_f32<2>(w, x, out, in, b, e, od); break;
      case 3: rows_f32<3>(w, x, out, in, b, e, od); break;
      case 4: rows_f32<4>(w, x, out, in, b, e, od); break;
      case 5: rows_f32<5>(w, x, out, in, b, e, od); break;
      case 6: rows_f32<6>(w, x, out, in, b, e, od); break;
      case 7: rows_f32<7>(w, x, out, in, b, e, od); break;
      default: rows_f32<8>(w, x, out, in, b, e, od); break;
    }
  });
#else
  run_generic<float>(w, x, out, in, n, od);
#endif
}

}  // namespace

// x: (n, in) with 1 <= n <= 8, weight: (out, in), both contiguous, same dtype (float32 or
// float64), on the CPU.  Returns (n, out).
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x and weight must be 2-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x and weight disagree on features");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "skinny_linear: 1 to 8 rows");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "skinny_linear: dtypes differ");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "skinny_linear: contiguous tensors");
  const int64_t n = x.size(0), in = x.size(1), od = weight.size(0);
  auto out = torch::empty({n, od}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run_f32(weight.data_ptr<float>(), x.data_ptr<float>(), out.data_ptr<float>(), in, n, od);
  } else if (x.scalar_type() == at::kDouble) {
    run_generic<double>(weight.data_ptr<double>(), x.data_ptr<double>(), out.data_ptr<double>(),
                        in, n, od);
  } else {
    TORCH_CHECK(false, "skinny_linear: float32 or float64 only");
  }
  return out;
}

bool has_simd() {
#ifdef MTP_HAVE_SIMD
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "weight-first product of 1-8 rows");
  m.def("has_simd", &has_simd, "whether the float32 path uses AVX2/AVX-512 intrinsics");
}
