// RMSNorm and rotary embeddings for the CPU, one call each instead of a chain of small torch ops.
//
// A batch-1 decode step of a 30-layer model runs 60 norms and 60 rotations; as torch expressions each is 6-7
// tiny ops (pow, mean, add, rsqrt, mul, mul, cast; slice, neg, cat, mul, mul, add) at a few microseconds of
// dispatch each, about 2 ms a step in all. Arithmetic is fp32 throughout and a bf16 result is rounded once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

inline void store(float* out, int64_t i, float v) { out[i] = v; }
inline void store(at::BFloat16* out, int64_t i, float v) { out[i] = at::BFloat16(v); }  // round to nearest even

template <typename Out>
void rms_norm_rows(const float* x, const float* w, double eps, int64_t tokens, int64_t d, Out* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = x + t * d;
      float squares = 0.0f;
      for (int64_t i = 0; i < d; ++i) squares += row[i] * row[i];
      const float inverse_rms = 1.0f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
      Out* dst = out + t * d;
      if (w != nullptr)
        for (int64_t i = 0; i < d; ++i) store(dst, i, row[i] * inverse_rms * w[i]);
      else
        for (int64_t i = 0; i < d; ++i) store(dst, i, row[i] * inverse_rms);
    }
  });
}

// out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t], rotate_half(a, b) = (-b, a) over the two halves.
template <typename T>
void rope_rows(const T* x, int64_t token_stride, int64_t tokens, int64_t heads, int64_t dim, const float* cos,
               const float* sin, T* out) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cos + t * dim;
      const float* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = x + t * token_stride + h * dim;
        T* dst = out + (t * heads + h) * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = static_cast<float>(src[i]), b = static_cast<float>(src[i + half]);
          dst[i] = static_cast<T>(a * c[i] - b * s[i]);
          dst[i + half] = static_cast<T>(b * c[i + half] + a * s[i + half]);
        }
      }
    }
  });
}

}  // namespace

// x [T, d] fp32 or bf16 (statistics in fp32 either way); weight [d] or None; the result is bf16 if bf16_out.
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight, double eps,
                       bool bf16_out) {
  TORCH_CHECK(x.dim() == 2, "x must be [T, d]");
  const auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t tokens = xf.size(0), d = xf.size(1);
  torch::Tensor wf;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == d, "weight must have d entries");
    wf = weight->to(torch::kFloat32).contiguous();
  }
  const float* wp = wf.defined() ? wf.data_ptr<float>() : nullptr;
  auto out = torch::empty({tokens, d}, xf.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  if (bf16_out)
    rms_norm_rows(xf.data_ptr<float>(), wp, eps, tokens, d, out.data_ptr<at::BFloat16>());
  else
    rms_norm_rows(xf.data_ptr<float>(), wp, eps, tokens, d, out.data_ptr<float>());
  return out;
}

// x [T, heads, dim] fp32 or bf16 with each token's heads contiguous (a column slice of the fused qkv output is
// fine); cos, sin [T, dim] fp32. Returns a contiguous [T, heads, dim] tensor of x's dtype.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, dim], rows packed");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  const auto c = cos.to(torch::kFloat32).contiguous(), s = sin.to(torch::kFloat32).contiguous();
  TORCH_CHECK(c.numel() == tokens * dim && s.numel() == tokens * dim, "cos and sin must be [T, dim]");
  auto out = torch::empty({tokens, heads, dim}, x.options());
  if (x.scalar_type() == torch::kFloat32)
    rope_rows(x.data_ptr<float>(), x.stride(0), tokens, heads, dim, c.data_ptr<float>(), s.data_ptr<float>(),
              out.data_ptr<float>());
  else
    rope_rows(x.data_ptr<at::BFloat16>(), x.stride(0), tokens, heads, dim, c.data_ptr<float>(),
              s.data_ptr<float>(), out.data_ptr<at::BFloat16>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, optional scale, fp32 statistics");
  m.def("apply_rope", &apply_rope, "rotary embedding (rotate-half convention) of [T, heads, dim]");
}
