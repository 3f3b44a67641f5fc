// Batched decode attention over vAttention KV slots, for the CPU.
//
// One query token per sequence attends over K[slot, :context_len] and V[slot, :context_len] of a per-layer cache
// [max_num_seqs, max_model_len, kv_heads, head_dim]. It reads nothing past a slot's context length (on a
// demand-paged cache that memory may be unmapped) and needs no block table. Work is split over
// (sequence, kv head) pairs; the query heads that share a kv head (GQA) reuse each loaded key/value row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
inline float to_float(scalar_t v) { return static_cast<float>(v); }

// A dot product written as 16 independent lanes, so the compiler vectorises it without reassociating floats.
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  float lanes[16] = {0.0f};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    for (int j = 0; j < 16; ++j) lanes[j] += a[d + j] * b[d + j];
  }
  float total = 0.0f;
  for (int j = 0; j < 16; ++j) total += lanes[j];
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

template <typename scalar_t>
void decode_attention_kernel(const float* q, const scalar_t* k_cache, const scalar_t* v_cache,
                             const int64_t* slots, const int64_t* lens, float* out,
                             int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             const int64_t* k_strides, const int64_t* v_strides, float scale) {
  // Strides (elements) of [slot, token, kv_head]; head_dim is contiguous. Caches may be strided views, e.g. one
  // per layer over a region whose token record holds every layer.
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> row(head_dim);
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / num_kv_heads;
      const int64_t kvh = work % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t k_base = slots[b] * k_strides[0] + kvh * k_strides[2];
      const int64_t v_base = slots[b] * v_strides[0] + kvh * v_strides[2];
      scores.assign(group * len, 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* key = k_cache + k_base + t * k_strides[1];
        for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(key[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float* query = q + (b * num_heads + kvh * group + g) * head_dim;
          scores[g * len + t] = dot_lanes(query, row.data(), head_dim) * scale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float peak = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) peak = std::max(peak, s[t]);
        float total = 0.0f;
        for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - peak); total += s[t]; }
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out + (b * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.0f;
      }
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* value = v_cache + v_base + t * v_strides[1];
        for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(value[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* o = out + (b * num_heads + kvh * group + g) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) o[d] += p * row[d];
        }
      }
    }
  });
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                               torch::Tensor slots, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: contiguous float32 [B, H, D]");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "caches: [S, T, KVH, D]");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1, "caches: head_dim must be contiguous");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "K and V caches differ in shape");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "K and V caches differ in dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64, "slots/lens: int64");
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_slots = key_cache.size(0), max_len = key_cache.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head shapes disagree");
  auto slots_c = slots.contiguous();
  auto lens_c = context_lens.contiguous();
  const int64_t* slot_ptr = slots_c.data_ptr<int64_t>();
  const int64_t* len_ptr = lens_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    // Bounds are checked before any read: a bad slot or length must be an error, never a wild read.
    TORCH_CHECK(slot_ptr[b] >= 0 && slot_ptr[b] < num_slots, "slot out of range");
    TORCH_CHECK(len_ptr[b] > 0 && len_ptr[b] <= max_len, "context length out of range");
  }
  const int64_t k_strides[3] = {key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)};
  const int64_t v_strides[3] = {value_cache.stride(0), value_cache.stride(1), value_cache.stride(2)};
  auto out = torch::empty_like(q);
  if (key_cache.scalar_type() == torch::kFloat32) {
    decode_attention_kernel<float>(q.data_ptr<float>(), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(),
                                   slot_ptr, len_ptr, out.data_ptr<float>(), batch, num_heads, num_kv_heads,
                                   head_dim, k_strides, v_strides, static_cast<float>(scale));
  } else if (key_cache.scalar_type() == torch::kBFloat16) {
    decode_attention_kernel<at::BFloat16>(q.data_ptr<float>(), key_cache.data_ptr<at::BFloat16>(),
                                          value_cache.data_ptr<at::BFloat16>(), slot_ptr, len_ptr,
                                          out.data_ptr<float>(), batch, num_heads, num_kv_heads, head_dim, k_strides,
                                          v_strides, static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "unsupported KV cache dtype");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Batched decode attention over KV cache slots (CPU)");
}
