// One decoding pass of a Llama-family decoder in a single call, for CPU decoding.
//
// transformers' forward spends ~20 ms of a ~40 ms one-token pass of a 135M model outside its
// products (the Python of 30 blocks, mask building, a cache that grows by concatenation).  Here
// a pass is one C++ call over the blocks: RMSNorm, the q/k/v, o, gate/up and down products (the
// few-row kernel of products.h up to kMaxRows rows, ATen's otherwise), rotary embedding as given
// by the model's own rotary module, keys and values written into preallocated cache buffers,
// attention of the block's queries over the cache, SiLU gating, residuals, the final norm and the
// output layer at the rows the caller reads.  The arithmetic follows transformers' Llama modules
// operation by operation (norms in float32 as LlamaRMSNorm does), so float64 models give the same
// tokens and float32 models agree to rounding.  Mask-gated adapters (mtp_torch.decoding.gated)
// add ``scale * B (A x)`` at the rows whose input is the mask token, and only there.
// Part of mtp-lm (mtp_torch.decoding.native).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "products.h"

namespace mtp {

// Per block: in_norm, q, k, v, o, post_norm, gate, up, down.
constexpr int kBlockTensors = 9;
// Adapted products per block, in order: q, k, v, o, gate, up, down.
constexpr int kAdapted = 7;


// y = weight * (x * rsqrt(mean(x^2) + eps)) with the statistics in float32, per row.
template <typename T>
void rms_norm(const T* x, const T* weight, T* y, int64_t rows, int64_t n, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(xr[i]);
      sum += v * v;
    }
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i)
      y[r * n + i] = weight[i] * static_cast<T>(static_cast<float>(xr[i]) * scale);
  }
}

// out (rows, od) = x (rows, in) @ weight^T for several weights, each with its adapter's update
// at the gated rows: the few-row kernel where the plan says so (bit rows - 1 of ``few``), ATen's
// product (what nn.Linear runs) otherwise.
inline bool runs_few(int64_t rows, uint32_t few) {
  return rows <= kMaxRows && ((few >> (rows - 1)) & 1u);
}

template <typename T>
void product(const torch::Tensor& x, int64_t rows, uint32_t few,
             const std::vector<Segment<T>>& segs, const std::vector<int64_t>& gated) {
  const int64_t in = x.size(1);
  if (runs_few(rows, few)) {
    few_row_product<T>(x.data_ptr<T>(), rows, in, segs, gated);
    return;
  }
  for (const auto& sg : segs) {
    auto w = torch::from_blob(const_cast<T*>(sg.weight), {sg.rows, in}, x.options());
    auto out = torch::from_blob(sg.out, {rows, sg.stride}, x.options());
    at::mm_out(out, x, w.t());
    if (!sg.adapted() || gated.empty()) continue;
    // B's update at the gated rows: scale * A x of each, then a dot product per output row.
    const T* xs = x.data_ptr<T>();
    std::vector<T> low(sg.rank), wide;
    const T* a = sg.a;
    if (sg.ah != nullptr) {  // float16 storage: the same values as T
      wide.resize(sg.rank * in);
      widen(sg.ah, wide.data(), sg.rank * in);
      a = wide.data();
    }
    Fold<T> fold;
    fold.b = sg.b;
    fold.bh = sg.bh;
    fold.low = low.data();
    fold.rank = sg.rank;
    fold.slot[0] = 0;
    for (int64_t m : gated) {
      for (int64_t r = 0; r < sg.rank; ++r) {
        T dot = 0;
        for (int64_t i = 0; i < in; ++i) dot += a[r * in + i] * xs[m * in + i];
        low[r] = static_cast<T>(sg.scale) * dot;
      }
      fold_rows<T>(fold, sg.out + m * sg.stride, 1, 0, sg.rows, sg.stride);
    }
  }
}

// x (rows, heads * d) <- x * cos + rotate_half(x) * sin, per head, cos/sin (rows, d).
template <typename T>
void rotary(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  std::vector<T> tmp(d);
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * d;
    const T* s = sin + r * d;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (r * heads + h) * d;
      for (int64_t i = 0; i < d; ++i) {
        const T rot = i < half ? -v[i + half] : v[i - half];
        tmp[i] = v[i] * c[i] + rot * s[i];
      }
      std::copy(tmp.begin(), tmp.end(), v);
    }
  }
}

// Attention of the block's queries over the cache (slots [0, past + width) of each row):
// query w of row b sees slot j when the caller's mask allows j and j <= past + w.
template <typename T>
void attend(const T* q, const T* kc, const T* vc, const uint8_t* allowed, T* out, const Shape& s) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim, slots = s.past + s.width;
#ifdef MTP_HAVE_SIMD
  if constexpr (std::is_same<T, float>::value) {
    if (simd_attention(d)) {
      // One task per (row, head, group of up to kQueries queries): a 7-token block of 9 heads
      // is 18 tasks, which 2 threads share evenly (9 whole heads split 5:4).
      const int64_t groups = (s.width + kQueries - 1) / kQueries;
      at::parallel_for(0, s.batch * s.heads * groups, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> score(kQueries * slots);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t head = task / groups, w0 = (task % groups) * kQueries;
          const int64_t b = head / s.heads, h = head % s.heads, g = h / group;
          const int64_t offset = ((b * s.kv_heads + g) * s.capacity) * d;
          attend_head_f32(q, kc + offset, vc + offset, allowed + b * slots, out, s, b, h, w0,
                          score);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> score(slots);
    std::vector<T> acc(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads, g = h / group;
      const T* keys = kc + ((b * s.kv_heads + g) * s.capacity) * d;
      const T* values = vc + ((b * s.kv_heads + g) * s.capacity) * d;
      const uint8_t* mask = allowed + b * slots;
      for (int64_t w = 0; w < s.width; ++w) {
        const T* qv = q + ((b * s.width + w) * s.heads + h) * d;
        const int64_t last = s.past + w;
        T top = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j <= last; ++j) {
          if (!mask[j]) continue;
          T dot = 0;
          const T* kv = keys + j * d;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qv[i] * kv[i];
          score[j] = dot * static_cast<T>(s.scaling);
          top = std::max(top, score[j]);
        }
        std::fill(acc.begin(), acc.end(), T(0));
        T total = 0;
        if (top != -std::numeric_limits<T>::infinity()) {
          for (int64_t j = 0; j <= last; ++j) {
            if (!mask[j]) continue;
            const T p = std::exp(score[j] - top);
            total += p;
            const T* vv = values + j * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) acc[i] += p * vv[i];
          }
        }
        T* o = out + ((b * s.width + w) * s.heads + h) * d;
        const T inv = total > 0 ? T(1) / total : T(0);
        for (int64_t i = 0; i < d; ++i) o[i] = acc[i] * inv;
      }
    }
  });
}

// Keys/values of the block (rows, kv_heads * d) into the caches at slots past .. past + width.
template <typename T>
void store(const T* src, T* cache, const Shape& s) {
  const int64_t d = s.head_dim;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t w = 0; w < s.width; ++w)
      for (int64_t g = 0; g < s.kv_heads; ++g)
        std::copy_n(src + ((b * s.width + w) * s.kv_heads + g) * d, d,
                    cache + ((b * s.kv_heads + g) * s.capacity + s.past + w) * d);
}

template <typename T>
torch::Tensor forward_blocks(torch::Tensor hidden, const torch::Tensor& cos,
                             const torch::Tensor& sin, const torch::Tensor& allowed,
                             const std::vector<int64_t>& gated,
                             const std::vector<torch::Tensor>& blocks,
                             const std::vector<torch::Tensor>& adapters,
                             const std::vector<double>& scales,
                             const std::vector<torch::Tensor>& packed, torch::Tensor k_cache,
                             torch::Tensor v_cache, const torch::Tensor& final_norm,
                             const torch::Tensor& head, const std::vector<int64_t>& read,
                             const Shape& s, uint32_t few) {
  const int64_t rows = s.batch * s.width, layers = k_cache.size(0);
  const int64_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  auto opts = hidden.options();
  auto h = hidden.reshape({rows, s.hidden}).clone();
  auto xn = torch::empty({rows, s.hidden}, opts);
  auto q = torch::empty({rows, qd}, opts), k = torch::empty({rows, kvd}, opts),
       v = torch::empty({rows, kvd}, opts), att = torch::empty({rows, qd}, opts);
  auto tmp = torch::empty({rows, s.hidden}, opts);
  auto g = torch::empty({rows, s.intermediate}, opts), u = torch::empty({rows, s.intermediate}, opts);
  const T* c = cos.data_ptr<T>();
  const T* sn = sin.data_ptr<T>();
  const uint8_t* mask = allowed.data_ptr<uint8_t>();
  const int64_t block_stride = s.batch * s.kv_heads * s.capacity * s.head_dim;
  // Mask-gated adapters act at the gated (mask-token) rows only, inside the products they adapt.
  const bool gate = !adapters.empty() && !gated.empty();
  const std::vector<int64_t> none;
  const std::vector<int64_t>& at_rows = gate ? gated : none;
  // Packed weights (see Q4Rows / Q8Rows): (q, scales) per product, q uint8 for Q4_1 and int8
  // for Q8_0, empty where a product is not packed; 7 products per block (whole), then the output
  // layer (its leading rows).  Returns how many rows are packed.
  auto pack = [&](Segment<T>& sg, int64_t index) -> int64_t {
    if (!std::is_same<T, float>::value || packed.empty()) return 0;
    const torch::Tensor& q = packed[index * 2];
    if (q.numel() == 0) return 0;
    sg.qs = reinterpret_cast<const float*>(packed[index * 2 + 1].data_ptr());
    if (q.scalar_type() == at::kByte) sg.q4 = q.data_ptr<uint8_t>();
    else sg.q8 = q.data_ptr<int8_t>();
    return q.size(0);
  };
  auto seg = [&](int64_t layer, int which, const torch::Tensor& weight, torch::Tensor& out) {
    Segment<T> sg{weight.data_ptr<T>(), out.data_ptr<T>(), weight.size(0), out.size(1)};
    const int64_t at_ = layer * kAdapted + which;
    pack(sg, at_);
    if (gate && adapters[at_ * 2].numel() > 0) {
      const torch::Tensor& a = adapters[at_ * 2];
      const torch::Tensor& b = adapters[at_ * 2 + 1];
      if (a.scalar_type() == at::kHalf) {  // float16 storage of float16-exact values
        sg.ah = reinterpret_cast<const uint16_t*>(a.data_ptr<at::Half>());
        sg.bh = reinterpret_cast<const uint16_t*>(b.data_ptr<at::Half>());
      } else {
        sg.a = a.data_ptr<T>();
        sg.b = b.data_ptr<T>();
      }
      sg.rank = a.size(0);
      sg.scale = scales[at_];
    }
    return sg;
  };
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &blocks[l * kBlockTensors];
    rms_norm<T>(h.data_ptr<T>(), w[0].data_ptr<T>(), xn.data_ptr<T>(), rows, s.hidden, s.eps);
    product<T>(xn, rows, few, {seg(l, 0, w[1], q), seg(l, 1, w[2], k), seg(l, 2, w[3], v)}, at_rows);
    rotary<T>(q.data_ptr<T>(), c, sn, rows, s.heads, s.head_dim);
    rotary<T>(k.data_ptr<T>(), c, sn, rows, s.kv_heads, s.head_dim);
    T* kc = k_cache.data_ptr<T>() + l * block_stride;
    T* vc = v_cache.data_ptr<T>() + l * block_stride;
    store<T>(k.data_ptr<T>(), kc, s);
    store<T>(v.data_ptr<T>(), vc, s);
    attend<T>(q.data_ptr<T>(), kc, vc, mask, att.data_ptr<T>(), s);
    product<T>(att, rows, few, {seg(l, 3, w[4], tmp)}, at_rows);
    h.add_(tmp);
    rms_norm<T>(h.data_ptr<T>(), w[5].data_ptr<T>(), xn.data_ptr<T>(), rows, s.hidden, s.eps);
    product<T>(xn, rows, few, {seg(l, 4, w[6], g), seg(l, 5, w[7], u)}, at_rows);
    at::silu_(g).mul_(u);  // ACT2FN["silu"](gate) * up, with ATen's vectorised exp
    product<T>(g, rows, few, {seg(l, 6, w[8], tmp)}, at_rows);
    h.add_(tmp);
  }
  const int64_t n = static_cast<int64_t>(read.size());
  auto picked = torch::empty({n, s.hidden}, opts), normed = torch::empty({n, s.hidden}, opts);
  for (int64_t i = 0; i < n; ++i)
    std::copy_n(h.data_ptr<T>() + read[i] * s.hidden, s.hidden,
                picked.data_ptr<T>() + i * s.hidden);
  rms_norm<T>(picked.data_ptr<T>(), final_norm.data_ptr<T>(), normed.data_ptr<T>(), n, s.hidden,
              s.eps);
  auto logits = torch::empty({n, head.size(0)}, opts);
  Segment<T> out_layer{head.data_ptr<T>(), logits.data_ptr<T>(), head.size(0), logits.size(1)};
  const int64_t packed_rows = pack(out_layer, layers * kAdapted);
  // Split only where the few-row kernel runs (ATen's product reads the float32 weight whole).
  product<T>(normed, n, few,
             packed_rows > 0 && runs_few(n, few) ? split_packed(out_layer, packed_rows, s.hidden)
                                                 : std::vector<Segment<T>>{out_layer},
             none);
  return logits;
}

}  // namespace mtp
