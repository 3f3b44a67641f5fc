// The small per-block ops of a decoder layer for the CPU (RMSNorm, residual add + RMSNorm, rotary embedding with
// the KV-cache write, SiLU-gated product), one call each instead of a chain of small torch ops.
//
// A batch-1 decode step of a 30-layer model runs 60 norms and 60 rotations; as torch expressions each is 6-7
// tiny ops (pow, mean, add, rsqrt, mul, mul, cast; slice, neg, cat, mul, mul, add) at a few microseconds of
// dispatch each, about 2 ms a step in all. Arithmetic is fp32 throughout and a bf16 result is rounded once.
// Between the weight streams of a decode step every small op also starts from cold caches (measured: each costs
// 2-4x its warm time inside a step), so fewer, fused calls save more than their dispatch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

inline void store(float* out, int64_t i, float v) { out[i] = v; }
inline void store(at::BFloat16* out, int64_t i, float v) { out[i] = at::BFloat16(v); }  // round to nearest even

// dst = row / rms(row) (* w), given the row's sum of squares.
template <typename Out>
inline void store_normalised(const float* row, float squares, const float* w, double eps, int64_t d, Out* dst) {
  const float inverse_rms = 1.0f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
  if (w != nullptr)
    for (int64_t i = 0; i < d; ++i) store(dst, i, row[i] * inverse_rms * w[i]);
  else
    for (int64_t i = 0; i < d; ++i) store(dst, i, row[i] * inverse_rms);
}

template <typename Out>
void rms_norm_rows(const float* x, const float* w, double eps, int64_t tokens, int64_t d, Out* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = x + t * d;
      float squares = 0.0f;
      for (int64_t i = 0; i < d; ++i) squares += row[i] * row[i];
      store_normalised(row, squares, w, eps, d, out + t * d);
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


inline float load_float(const float* p, int64_t i) { return p[i]; }
inline float load_float(const at::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }

// hidden[t] += delta[t] (fp32 residual, fp32 or bf16 delta), then out[t] = RMSNorm(hidden[t]) * w.
template <typename Delta, typename Out>
void add_rms_norm_rows(float* hidden, const Delta* delta, const float* w, double eps, int64_t tokens, int64_t d,
                       Out* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = hidden + t * d;
      const Delta* add = delta + t * d;
      float squares = 0.0f;
      for (int64_t i = 0; i < d; ++i) {
        row[i] += load_float(add, i);
        squares += row[i] * row[i];
      }
      store_normalised(row, squares, w, eps, d, out + t * d);
    }
  });
}

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]: gate and up stacked along the row, as one linear emits them.
template <typename T>
void silu_mul_rows(const T* gate_up, int64_t tokens, int64_t inter, T* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* gate = gate_up + t * 2 * inter;
      const T* up = gate + inter;
      T* dst = out + t * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        dst[i] = static_cast<T>(g / (1.0f + std::exp(-g)) * static_cast<float>(up[i]));
      }
    }
  });
}

// Rotates one head (rotate-half convention) from src into dst, converting to the destination's type.
template <typename Src, typename Dst>
inline void rope_head(const Src* src, const float* c, const float* s, int64_t dim, Dst* dst) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(src[i]), b = static_cast<float>(src[i + half]);
    dst[i] = static_cast<Dst>(a * c[i] - b * s[i]);
    dst[i + half] = static_cast<Dst>(b * c[i + half] + a * s[i + half]);
  }
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

// hidden [T, d] fp32 (updated in place: hidden += delta), delta [T, d] fp32 or bf16; returns RMSNorm(hidden) * weight
// as bf16 if bf16_out. The residual add and the next block's norm in one pass over the row.
torch::Tensor add_rms_norm(torch::Tensor& hidden, const torch::Tensor& delta, const c10::optional<torch::Tensor>& weight,
                           double eps, bool bf16_out) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == torch::kFloat32 && hidden.is_contiguous(),
              "hidden must be a contiguous [T, d] float32 tensor");
  TORCH_CHECK(delta.sizes() == hidden.sizes(), "delta must have hidden's shape");
  TORCH_CHECK(delta.scalar_type() == torch::kFloat32 || delta.scalar_type() == torch::kBFloat16, "delta: fp32 or bf16");
  const auto dc = delta.contiguous();
  const int64_t tokens = hidden.size(0), d = hidden.size(1);
  torch::Tensor wf;
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == d, "weight must have d entries");
    wf = weight->to(torch::kFloat32).contiguous();
  }
  const float* wp = wf.defined() ? wf.data_ptr<float>() : nullptr;
  auto out = torch::empty({tokens, d}, hidden.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  float* hp = hidden.data_ptr<float>();
  if (dc.scalar_type() == torch::kFloat32) {
    if (bf16_out)
      add_rms_norm_rows(hp, dc.data_ptr<float>(), wp, eps, tokens, d, out.data_ptr<at::BFloat16>());
    else
      add_rms_norm_rows(hp, dc.data_ptr<float>(), wp, eps, tokens, d, out.data_ptr<float>());
  } else {
    if (bf16_out)
      add_rms_norm_rows(hp, dc.data_ptr<at::BFloat16>(), wp, eps, tokens, d, out.data_ptr<at::BFloat16>());
    else
      add_rms_norm_rows(hp, dc.data_ptr<at::BFloat16>(), wp, eps, tokens, d, out.data_ptr<float>());
  }
  return out;
}

// gate_up [T, 2 * inter] fp32 or bf16 -> silu(gate) * up [T, inter] of the same dtype (fp32 arithmetic).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * inter]");
  const auto g = gate_up.contiguous();
  const int64_t tokens = g.size(0), inter = g.size(1) / 2;
  auto out = torch::empty({tokens, inter}, g.options());
  if (g.scalar_type() == torch::kFloat32)
    silu_mul_rows(g.data_ptr<float>(), tokens, inter, out.data_ptr<float>());
  else if (g.scalar_type() == torch::kBFloat16)
    silu_mul_rows(g.data_ptr<at::BFloat16>(), tokens, inter, out.data_ptr<at::BFloat16>());
  else
    TORCH_CHECK(false, "gate_up must be fp32 or bf16");
  return out;
}

template <typename T, typename C>
void rope_store_rows(const T* qkv, int64_t row_stride, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                     const float* cos, const float* sin, const int64_t* slot, const int64_t* position, C* key,
                     C* value, const int64_t (&ks)[3], const int64_t (&vs)[3], T* q_out) {
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* row = qkv + t * row_stride;
      const float* c = cos + t * dim;
      const float* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) rope_head(row + h * dim, c, s, dim, q_out + (t * heads + h) * dim);
      C* k_dst = key + slot[t] * ks[0] + position[t] * ks[1];
      C* v_dst = value + slot[t] * vs[0] + position[t] * vs[1];
      const T* k_src = row + heads * dim;
      const T* v_src = k_src + kv_heads * dim;
      for (int64_t h = 0; h < kv_heads; ++h) {
        rope_head(k_src + h * dim, c, s, dim, k_dst + h * ks[2]);
        for (int64_t i = 0; i < dim; ++i) v_dst[h * vs[2] + i] = static_cast<C>(static_cast<float>(v_src[h * dim + i]));
      }
    }
  });
}

// qkv [T, (heads + 2 * kv_heads) * dim] (q, k, v stacked, as the fused projection emits them; fp32 or bf16);
// cos, sin [T, dim] fp32; caches [slots, positions, kv_heads, dim] of one dtype (fp32 or bf16, head_dim
// contiguous, other strides free: vAttention views); slot_of_token, position_of_token [T] int64. Rotates k and
// stores it with v at each token's (slot, position), and returns the rotated q [T, heads, dim] in qkv's dtype.
torch::Tensor rope_store_kv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            torch::Tensor& key_cache, torch::Tensor& value_cache, const torch::Tensor& slot_of_token,
                            const torch::Tensor& position_of_token, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, width] with contiguous rows");
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 || qkv.scalar_type() == torch::kBFloat16, "qkv: fp32 or bf16");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "caches must be [slots, positions, kv_heads, dim]");
  const int64_t tokens = qkv.size(0), dim = key_cache.size(3);
  TORCH_CHECK(dim % 2 == 0 && qkv.size(1) == (heads + 2 * kv_heads) * dim && key_cache.size(2) == kv_heads,
              "qkv's width must be (heads + 2 * kv_heads) * head_dim of the caches");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type() && key_cache.stride(3) == 1 &&
                  value_cache.stride(3) == 1 && value_cache.sizes() == key_cache.sizes(),
              "caches: one shape, one dtype, head_dim contiguous");
  const auto c = cos.to(torch::kFloat32).contiguous(), s = sin.to(torch::kFloat32).contiguous();
  TORCH_CHECK(c.numel() == tokens * dim && s.numel() == tokens * dim, "cos and sin must be [T, dim]");
  const auto slots = slot_of_token.to(torch::kInt64).contiguous(), positions = position_of_token.to(torch::kInt64).contiguous();
  TORCH_CHECK(slots.numel() == tokens && positions.numel() == tokens, "one slot and one position per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)  // an index past the cache would write outside it: refuse, do not corrupt
    TORCH_CHECK(sp[t] >= 0 && sp[t] < key_cache.size(0) && pp[t] >= 0 && pp[t] < key_cache.size(1),
                "slot or position outside the cache");
  const int64_t ks[3] = {key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)};
  const int64_t vs[3] = {value_cache.stride(0), value_cache.stride(1), value_cache.stride(2)};
  auto q = torch::empty({tokens, heads, dim}, qkv.options());
  const float* cp = c.data_ptr<float>();
  const float* snp = s.data_ptr<float>();
  const bool bf16_cache = key_cache.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16_cache || key_cache.scalar_type() == torch::kFloat32, "caches: fp32 or bf16");
  if (qkv.scalar_type() == torch::kFloat32) {
    const float* src = qkv.data_ptr<float>();
    if (bf16_cache)
      rope_store_rows(src, qkv.stride(0), tokens, heads, kv_heads, dim, cp, snp, sp, pp,
                      key_cache.data_ptr<at::BFloat16>(), value_cache.data_ptr<at::BFloat16>(), ks, vs, q.data_ptr<float>());
    else
      rope_store_rows(src, qkv.stride(0), tokens, heads, kv_heads, dim, cp, snp, sp, pp, key_cache.data_ptr<float>(),
                      value_cache.data_ptr<float>(), ks, vs, q.data_ptr<float>());
  } else {
    const at::BFloat16* src = qkv.data_ptr<at::BFloat16>();
    if (bf16_cache)
      rope_store_rows(src, qkv.stride(0), tokens, heads, kv_heads, dim, cp, snp, sp, pp,
                      key_cache.data_ptr<at::BFloat16>(), value_cache.data_ptr<at::BFloat16>(), ks, vs,
                      q.data_ptr<at::BFloat16>());
    else
      rope_store_rows(src, qkv.stride(0), tokens, heads, kv_heads, dim, cp, snp, sp, pp, key_cache.data_ptr<float>(),
                      value_cache.data_ptr<float>(), ks, vs, q.data_ptr<at::BFloat16>());
  }
  return q;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, optional scale, fp32 statistics");
  m.def("apply_rope", &apply_rope, "rotary embedding (rotate-half convention) of [T, heads, dim]");
  m.def("add_rms_norm", &add_rms_norm, "hidden += delta in place, then RMSNorm of each row");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a stacked [T, 2 * inter] projection");
  m.def("rope_store_kv", &rope_store_kv, "rotate q and k of a fused qkv, store k and v in the caches, return q");
}
