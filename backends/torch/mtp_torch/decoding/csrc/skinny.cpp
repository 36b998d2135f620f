// The compiled CPU decoding kernels of mtp-lm (mtp_torch.decoding.native): the few-row product
// (products.h) behind linear_kernel="native", and the one-call Llama pass (forward.h) behind the
// fused decoding backend (mtp_torch.decoding.fused).
#include <torch/extension.h>

#include "forward.h"
#include "products.h"

namespace {

void check_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, ": contiguous CPU tensor needed");
}

}  // namespace

// x: (n, in) with 1 <= n <= 8, weight: (out, in), both contiguous, same dtype (float32 or
// float64), on the CPU.  Returns (n, out).
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x and weight must be 2-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x and weight disagree on features");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= mtp::kMaxRows, "skinny_linear: 1 to 8 rows");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "skinny_linear: dtypes differ");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "skinny_linear: contiguous tensors");
  const int64_t n = x.size(0), in = x.size(1), od = weight.size(0);
  auto out = torch::empty({n, od}, x.options());
  if (x.scalar_type() == at::kFloat) {
    mtp::few_row_product<float>(x.data_ptr<float>(), n, in,
                                {{weight.data_ptr<float>(), out.data_ptr<float>(), od, od}});
  } else if (x.scalar_type() == at::kDouble) {
    mtp::few_row_product<double>(x.data_ptr<double>(), n, in,
                                 {{weight.data_ptr<double>(), out.data_ptr<double>(), od, od}});
  } else {
    TORCH_CHECK(false, "skinny_linear: float32 or float64 only");
  }
  return out;
}

// One pass of a Llama-family decoder (see forward.h).  hidden: (batch, width, hidden) input
// embeddings; cos/sin: (batch, width, head_dim) from the model's rotary module; allowed:
// (batch, past + width) uint8, 1 where a slot may be attended; gated: flat row indices of
// mask-token rows; blocks: 9 tensors per block; adapters: 14 per block (A and B, for
// q, k, v, o, gate, up, down; empty tensors where a product has none) or none; scales: 7 per block;
// k_cache/v_cache: (layers, batch, kv_heads, capacity, head_dim), written at past .. past +
// width; read: flat row indices whose logits are returned; few: bit n - 1 set when a product of
// n rows runs the few-row kernel.  Returns (len(read), vocab) logits.
torch::Tensor fused_forward(const torch::Tensor& hidden, const torch::Tensor& cos,
                            const torch::Tensor& sin, const torch::Tensor& allowed,
                            const std::vector<int64_t>& gated,
                            const std::vector<torch::Tensor>& blocks,
                            const std::vector<torch::Tensor>& adapters,
                            const std::vector<double>& scales,
                            const std::vector<torch::Tensor>& packed, torch::Tensor k_cache,
                            torch::Tensor v_cache, const torch::Tensor& final_norm,
                            const torch::Tensor& head, const std::vector<int64_t>& read,
                            int64_t heads, int64_t past, double eps, double scaling, int64_t few) {
  check_cpu(hidden, "hidden");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  check_cpu(allowed, "allowed");
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  TORCH_CHECK(hidden.dim() == 3 && k_cache.dim() == 5, "fused_forward: bad ranks");
  TORCH_CHECK(allowed.scalar_type() == at::kByte, "fused_forward: allowed must be uint8");
  const int64_t layers = k_cache.size(0);
  TORCH_CHECK(static_cast<int64_t>(blocks.size()) == layers * mtp::kBlockTensors,
              "fused_forward: 9 tensors per block");
  TORCH_CHECK(adapters.empty() ||
                  static_cast<int64_t>(adapters.size()) == layers * mtp::kAdapted * 2,
              "fused_forward: 14 adapter tensors per block or none");
  TORCH_CHECK(packed.empty() ||
                  static_cast<int64_t>(packed.size()) == (layers * mtp::kAdapted + 1) * 2,
              "fused_forward: 14 packed tensors per block and 2 for the output layer, or none");
  for (const auto& t : packed) check_cpu(t, "packed weight");
  for (const auto& t : blocks) check_cpu(t, "block weight");
  mtp::Shape s{hidden.size(0),  hidden.size(1),  hidden.size(2), heads,      k_cache.size(2),
               k_cache.size(4), blocks[6].size(0), k_cache.size(3), past,     eps,
               scaling};
  TORCH_CHECK(past + s.width <= s.capacity, "fused_forward: the cache is too small");
  TORCH_CHECK(allowed.size(0) == s.batch && allowed.size(1) == past + s.width,
              "fused_forward: allowed must be (batch, past + width)");
  for (int64_t r : read) TORCH_CHECK(r >= 0 && r < s.batch * s.width, "fused_forward: bad read");
  for (int64_t r : gated) TORCH_CHECK(r >= 0 && r < s.batch * s.width, "fused_forward: bad row");
  const uint32_t mask = static_cast<uint32_t>(few);
  if (hidden.scalar_type() == at::kFloat)
    return mtp::forward_blocks<float>(hidden, cos, sin, allowed, gated, blocks, adapters, scales, packed,
                                      k_cache, v_cache, final_norm, head, read, s, mask);
  TORCH_CHECK(hidden.scalar_type() == at::kDouble, "fused_forward: float32 or float64 only");
  return mtp::forward_blocks<double>(hidden, cos, sin, allowed, gated, blocks, adapters, scales, packed,
                                     k_cache, v_cache, final_norm, head, read, s, mask);
}

// skinny_linear with the weight read packed (mtp_torch.decoding.packing): q (rows, in / 2) uint8
// for Q4_1 or (rows, in) int8 for Q8_0, scales their per-block float32 (d, m) or d, for the
// leading rows <= out of weight, which holds the same values in float32 (the kernel reads the
// rest from it).
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& q, const torch::Tensor& scales) {
  TORCH_CHECK(mtp::has_simd(), "packed_linear: needs the AVX2/AVX-512 build");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  scales.scalar_type() == at::kFloat,
              "packed_linear: float32 x, weight and scales");
  TORCH_CHECK(q.scalar_type() == at::kByte || q.scalar_type() == at::kChar,
              "packed_linear: q must be uint8 (Q4_1) or int8 (Q8_0)");
  for (const auto* t : {&x, &weight, &q, &scales}) check_cpu(*t, "packed_linear");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                  x.size(1) % 32 == 0 && x.size(0) >= 1 && x.size(0) <= mtp::kMaxRows,
              "packed_linear: 1 to 8 rows, features a multiple of 32");
  const int64_t n = x.size(0), in = x.size(1), od = weight.size(0);
  const bool q4 = q.scalar_type() == at::kByte;
  const int64_t rows = q.size(0);  // leading rows packed; the rest read from weight
  TORCH_CHECK(q.dim() == 2 && rows <= od && q.numel() == rows * (q4 ? in / 2 : in) &&
                  scales.numel() == rows * (in / 32) * (q4 ? 2 : 1),
              "packed_linear: q or scales have the wrong size");
  auto out = torch::empty({n, od}, x.options());
  mtp::Segment<float> sg{weight.data_ptr<float>(), out.data_ptr<float>(), od, od};
  sg.qs = scales.data_ptr<float>();
  if (q4) sg.q4 = q.data_ptr<uint8_t>();
  else sg.q8 = q.data_ptr<int8_t>();
  mtp::few_row_product<float>(x.data_ptr<float>(), n, in, mtp::split_packed(sg, rows, in));
  return out;
}

bool has_simd() { return mtp::has_simd(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "weight-first product of 1-8 rows");
  m.def("fused_forward", &fused_forward, "one decoding pass of a Llama-family decoder");
  m.def("packed_linear", &packed_linear, "skinny_linear reading Q4_1/Q8_0-packed weights");
  m.def("has_simd", &has_simd, "whether the float32 path uses AVX2/AVX-512 intrinsics");
}
