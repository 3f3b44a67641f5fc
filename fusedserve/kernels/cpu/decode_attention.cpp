// Batched decode attention over vAttention KV slots, for the CPU.
//
// One query token per sequence attends over K[slot, :context_len] and V[slot, :context_len] of a per-layer cache
// [max_num_seqs, max_model_len, kv_heads, head_dim] (float32 or bfloat16; head_dim contiguous, other strides
// arbitrary, e.g. one layer's view of a region whose token record holds every layer). It reads nothing past a
// slot's context length (on a demand-paged cache that memory may be unmapped) and needs no block table; slots and
// lengths are checked before any read.
//
// One pass: tokens go in blocks of 16 through an online softmax (per query head a running max, a running sum and
// an unnormalised output), so each key and value row is read once, for every kv head of the token and every query
// head of its GQA group. Threads split the batch's tokens evenly; a sequence cut between threads (one long
// sequence, or a boundary inside one) keeps a partial softmax per piece and the pieces are merged at the end
// (flash-decoding). Three paths, picked per call:
// - AMX (bf16 caches, head_dim % 32 == 0, <= 16 heads): q.K^T of a block is tile multiplies of the key rows, read
//   in place, against q split into bf16 hi + lo halves (|q - hi - lo| ~ 2^-18 |q|, so scores stay ~fp32-exact);
// - AVX-512 (float32 caches, or where AMX is missing): one 16-lane partial dot per token and head, folded by a
//   transposing add tree; bf16 widened by a 16-bit shift in registers;
// - portable scalar loops everywhere else (no AVX-512, or a head_dim without an instantiation).
// Values are AVX-512 FMAs on both vector paths. Each block prefetches the next block's rows into L1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__linux__)
#define FUSEDSERVE_DECODE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

namespace {

constexpr int kBlock = 16;                 // tokens per online-softmax step: one AVX-512 vector of scores
constexpr int64_t kMinTokensPerPart = 256;  // per thread: 2 x 256 tokens split measured 1.6x faster than 1 thread
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNoScore = -1e30f;  // a finite minus infinity: -ffast-math lets the compiler assume no infinities

// Scratch on 64-byte boundaries: a vector load or tile row that straddles two cache lines costs twice (tile loads
// measured ~2.5x slower unaligned).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <typename T>
using Buffer = std::vector<T, Aligned64<T>>;

// The geometry of one call. Scores live in log2 units: q is pre-scaled by scale * log2(e), probabilities are 2^x.
struct Problem {
  int64_t num_heads, num_kv_heads, group, head_dim;
  int64_t k_strides[3], v_strides[3];  // elements per step of [slot, token, kv_head]
  float q_scale;
};

// Tokens [begin, end) of sequence `seq`, done by one thread. `partial` indexes the partial-result buffers when the
// sequence is split between threads, else -1 (the segment normalises straight into the output).
struct Segment {
  int64_t seq, begin, end, partial;
};

// One thread's running softmax over a segment. Per query head h: max[h]; sum[h] = sum of 2^(s - max[h]) (the
// per-lane paths keep it as lanes[h * kBlock + t] and fold it in finish()); acc[h * D + d] = sum of
// 2^(s - max[h]) * v[d]. probs (one block's probabilities), rescale, keys and tiles are scratch of the paths.
// Per-head arrays are padded to 16 so the AMX path can treat them as one vector over heads.
struct RunningSoftmax {
  Buffer<float> query, max, sum, lanes, acc, probs, rescale, keys;
  Buffer<uint16_t> tiles;

  explicit RunningSoftmax(const Problem& p)
      : query(p.num_heads * p.head_dim), max(padded(p)), sum(padded(p)), lanes(p.num_heads * kBlock),
        acc(p.num_heads * p.head_dim), probs(padded(p) * kBlock), rescale(padded(p)) {}

  static int64_t padded(const Problem& p) { return std::max<int64_t>(p.num_heads, kBlock); }

  void start(const Problem& p, const float* q) {
    for (size_t i = 0; i < query.size(); ++i) query[i] = q[i] * p.q_scale;
    std::fill(max.begin(), max.end(), kNoScore);
    std::fill(sum.begin(), sum.end(), 0.0f);
    std::fill(lanes.begin(), lanes.end(), 0.0f);
    std::fill(acc.begin(), acc.end(), 0.0f);
  }

  void fold_lanes(const Problem& p) {
    for (int64_t h = 0; h < p.num_heads; ++h) {
      float total = 0.0f;
      for (int t = 0; t < kBlock; ++t) total += lanes[h * kBlock + t];
      sum[h] = total;
    }
  }
};

// The portable path: plain loops over one block of n <= kBlock tokens (k, v point at the block's first token).
struct ScalarOps {
  static void begin_part() {}
  static void end_part() {}
  template <typename scalar_t>
  static void start(const Problem&, RunningSoftmax&) {}
  static void finish(const Problem& p, RunningSoftmax& st) { st.fold_lanes(p); }

  template <typename scalar_t>
  static void scores(const Problem& p, RunningSoftmax& st, const scalar_t* k, int n) {
    const int64_t D = p.head_dim;
    for (int64_t h = 0; h < p.num_heads; ++h) {
      const float* query = st.query.data() + h * D;
      const scalar_t* key = k + (h / p.group) * p.k_strides[2];
      for (int t = 0; t < n; ++t) {
        const scalar_t* row = key + t * p.k_strides[1];
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += query[d] * static_cast<float>(row[d]);
        st.probs[h * kBlock + t] = s;
      }
    }
  }

  static void softmax(const Problem& p, RunningSoftmax& st, int n) {
    for (int64_t h = 0; h < p.num_heads; ++h) {
      float* s = st.probs.data() + h * kBlock;
      float* lanes = st.lanes.data() + h * kBlock;
      float peak = st.max[h];
      for (int t = 0; t < n; ++t) peak = std::max(peak, s[t]);
      st.rescale[h] = std::exp2(st.max[h] - peak);
      st.max[h] = peak;
      for (int t = 0; t < kBlock; ++t) {
        s[t] = t < n ? std::exp2(s[t] - peak) : 0.0f;
        lanes[t] = lanes[t] * st.rescale[h] + s[t];
      }
    }
  }

  template <typename scalar_t>
  static void values(const Problem& p, RunningSoftmax& st, const scalar_t* v, int n) {
    const int64_t D = p.head_dim;
    for (int64_t h = 0; h < p.num_heads; ++h) {
      float* acc = st.acc.data() + h * D;
      const float* s = st.probs.data() + h * kBlock;
      const scalar_t* value = v + (h / p.group) * p.v_strides[2];
      for (int64_t d = 0; d < D; ++d) acc[d] *= st.rescale[h];
      for (int t = 0; t < n; ++t) {
        const scalar_t* row = value + t * p.v_strides[1];
        for (int64_t d = 0; d < D; ++d) acc[d] += s[t] * static_cast<float>(row[d]);
      }
    }
  }
};

#if defined(__AVX512F__)
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {  // bf16 is the top half of a float: widen and shift
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 2^x for x <= 0 (clamped at -125, where the result no longer matters beside the block's 2^0 = 1): x = n + r,
// |r| <= 1/2, 2^r by its degree-6 Taylor polynomial (relative error ~1e-7), times 2^n by scalef.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));  // (x - n) * ln 2
  __m512 poly = _mm512_set1_ps(1.0f / 720);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(poly, n);
}

// Lane t of the result = the sum of the 16 lanes of part[t]: a transposing add tree, 45 shuffles/adds in all.
inline __m512 sum_lanes_16(__m512 (&part)[kBlock]) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lane k: [a0+a2, b0+b2, a1+a3, b1+b3] of its 4 floats of a and b
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(part[2 * i], part[2 * i + 1]),
                             _mm512_unpackhi_ps(part[2 * i], part[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // 128-bit lane k: the lane-k sums of tokens 4i..4i+3
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(pairs[2 * i]), _mm512_castps_pd(pairs[2 * i + 1]));
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // fold 128-bit lanes 0+1 and 2+3 of two quads
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// acc[j] = acc[j] * rescale[j] + sum_t probs[j * head_stride + t * token_stride] * v[t] for HB consecutive query
// heads of one kv head, the accumulators in registers for the whole block.
template <int ND, int HB, typename scalar_t>
inline void accumulate_values(const scalar_t* value, int64_t value_stride, int n, const float* probs,
                              int64_t head_stride, int64_t token_stride, const float* rescale, float* acc) {
  constexpr int D = ND * 16;
  __m512 sum[HB][ND];
  for (int j = 0; j < HB; ++j)
    for (int c = 0; c < ND; ++c)
      sum[j][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + j * D + 16 * c), _mm512_set1_ps(rescale[j]));
  for (int t = 0; t < n; ++t) {
    const scalar_t* row = value + t * value_stride;
    __m512 v[ND];
    for (int c = 0; c < ND; ++c) v[c] = load16(row + 16 * c);
    for (int j = 0; j < HB; ++j) {
      const __m512 weight = _mm512_set1_ps(probs[j * head_stride + t * token_stride]);
      for (int c = 0; c < ND; ++c) sum[j][c] = _mm512_fmadd_ps(weight, v[c], sum[j][c]);
    }
  }
  for (int j = 0; j < HB; ++j)
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(acc + j * D + 16 * c, sum[j][c]);
}

// The AVX-512 path for head_dim = 16 * ND. Block probabilities are head-major: probs[h * kBlock + t].
template <int ND>
struct Avx512Ops {
  static constexpr int D = ND * 16;
  static constexpr int kHeadsAtOnce = ND <= 4 ? 4 : ND <= 8 ? 2 : 1;  // value accumulators stay in registers

  static void begin_part() {}
  static void end_part() {}
  template <typename scalar_t>
  static void start(const Problem& p, RunningSoftmax& st) {
    if constexpr (!std::is_same_v<scalar_t, float>) st.keys.resize(p.num_kv_heads * kBlock * D);
  }
  static void finish(const Problem& p, RunningSoftmax& st) { st.fold_lanes(p); }

  // Lane t = q . k[t] (log2 units) for one query head over the block's n tokens (key rows `token_stride` apart).
  static __m512 head_scores(const float* q, const float* key, int64_t token_stride, int n) {
    __m512 query[ND], part[kBlock];
    for (int c = 0; c < ND; ++c) query[c] = _mm512_loadu_ps(q + 16 * c);
    for (int t = 0; t < kBlock; ++t) {
      if (t >= n) {  // never load past the context: the block's missing tokens score nothing
        part[t] = _mm512_setzero_ps();
        continue;
      }
      const float* row = key + t * token_stride;
      __m512 dot = _mm512_mul_ps(query[0], _mm512_loadu_ps(row));
      for (int c = 1; c < ND; ++c) dot = _mm512_fmadd_ps(query[c], _mm512_loadu_ps(row + 16 * c), dot);
      part[t] = dot;
    }
    return sum_lanes_16(part);
  }

  // bf16 keys are widened once per block into st.keys ([kv_head][token][D], L1-resident), not once per query head.
  template <typename scalar_t>
  static void scores(const Problem& p, RunningSoftmax& st, const scalar_t* k, int n) {
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    const float* keys;
    int64_t token_stride, head_stride;
    if constexpr (std::is_same_v<scalar_t, float>) {
      keys = k, token_stride = p.k_strides[1], head_stride = p.k_strides[2];
    } else {
      for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh)
        for (int t = 0; t < n; ++t) {
          const scalar_t* row = k + t * p.k_strides[1] + kvh * p.k_strides[2];
          float* widened = st.keys.data() + (kvh * kBlock + t) * D;
          for (int c = 0; c < ND; ++c) _mm512_storeu_ps(widened + 16 * c, load16(row + 16 * c));
        }
      keys = st.keys.data(), token_stride = D, head_stride = kBlock * D;
    }
    for (int64_t h = 0; h < p.num_heads; ++h) {
      const __m512 s = head_scores(st.query.data() + h * D, keys + (h / p.group) * head_stride, token_stride, n);
      _mm512_storeu_ps(st.probs.data() + h * kBlock, _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNoScore), s));
    }
  }

  static void softmax(const Problem& p, RunningSoftmax& st, int n) {
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t h = 0; h < p.num_heads; ++h) {
      float* s = st.probs.data() + h * kBlock;
      float* lanes = st.lanes.data() + h * kBlock;
      const __m512 scores = _mm512_loadu_ps(s);
      const float peak = _mm512_reduce_max_ps(scores);
      __m512 sum = _mm512_loadu_ps(lanes);
      st.rescale[h] = 1.0f;
      if (peak > st.max[h]) {  // the running max rarely moves after the first blocks: skip the rescale then
        st.rescale[h] = std::exp2(st.max[h] - peak);
        st.max[h] = peak;
        sum = _mm512_mul_ps(sum, _mm512_set1_ps(st.rescale[h]));
      }
      const __m512 prob = _mm512_maskz_mov_ps(valid, exp2_ps(_mm512_sub_ps(scores, _mm512_set1_ps(st.max[h]))));
      _mm512_storeu_ps(s, prob);
      _mm512_storeu_ps(lanes, _mm512_add_ps(sum, prob));
    }
  }

  template <typename scalar_t>
  static void values(const Problem& p, RunningSoftmax& st, const scalar_t* v, int n) {
    values_from(p, st, v, n, kBlock, 1);
  }

  // Block probabilities of head h, token t at probs[h * head_stride + t * token_stride].
  template <typename scalar_t>
  static void values_from(const Problem& p, RunningSoftmax& st, const scalar_t* v, int n, int64_t head_stride,
                          int64_t token_stride) {
    for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      const scalar_t* value = v + kvh * p.v_strides[2];
      for (int64_t j = 0; j < p.group;) {
        const int64_t h = kvh * p.group + j;
        const int64_t heads = std::min<int64_t>(kHeadsAtOnce, p.group - j);
        const float* probs = st.probs.data() + h * head_stride;
        const float* rescale = st.rescale.data() + h;
        float* acc = st.acc.data() + h * D;
        const int64_t stride = p.v_strides[1];
        if (heads >= 4)
          accumulate_values<ND, (kHeadsAtOnce >= 4 ? 4 : 1)>(value, stride, n, probs, head_stride, token_stride,
                                                             rescale, acc);
        else if (heads == 3)
          accumulate_values<ND, (kHeadsAtOnce >= 3 ? 3 : 1)>(value, stride, n, probs, head_stride, token_stride,
                                                             rescale, acc);
        else if (heads == 2)
          accumulate_values<ND, (kHeadsAtOnce >= 2 ? 2 : 1)>(value, stride, n, probs, head_stride, token_stride,
                                                             rescale, acc);
        else
          accumulate_values<ND, 1>(value, stride, n, probs, head_stride, token_stride, rescale, acc);
        j += heads;
      }
    }
  }
};
#endif

#if defined(FUSEDSERVE_DECODE_AMX)
// Linux hands out AMX tile state only to processes that ask (once; oneDNN asks the same way).
bool amx_usable() {
  static const bool usable = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return usable;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The AMX path for bf16 caches, head_dim = 16 * ND (ND even), at most 16 query heads. Per block the scores are
// one tile C[token][head] (fp32, 16 x 16): for each kv head and 32-wide chunk of head_dim, the key rows (tile A,
// loaded in place with the token stride) times q's hi and lo halves laid out as tile B[d pair][head] (zero in the
// columns of other kv heads' query heads). Block probabilities are token-major: probs[t * 16 + h]; the softmax runs
// as one vector over heads.
template <int ND>
struct AmxBf16Ops : Avx512Ops<ND> {
  static constexpr int D = ND * 16, kChunks = D / 32, kTileElems = 16 * 32;  // a B tile: 16 rows of 32 bf16

  static void begin_part() {
    TileConfig config;
    for (int tile = 0; tile < 5; ++tile) config.colsb[tile] = 64, config.rows[tile] = 16;
    _tile_loadconfig(&config);
  }
  static void end_part() { _tile_release(); }

  // q as B tiles [kv head][chunk][hi, lo], plus room for a zero-padded copy of a short block's key rows.
  template <typename scalar_t>
  static void start(const Problem& p, RunningSoftmax& st) {
    const int64_t q_tiles = p.num_kv_heads * kChunks * 2 * kTileElems;
    if (static_cast<int64_t>(st.tiles.size()) != q_tiles + p.num_kv_heads * kBlock * D) {
      st.tiles.assign(q_tiles + p.num_kv_heads * kBlock * D, 0);  // other groups' columns stay zero
    }
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(64));
    for (int64_t h = 0; h < p.num_heads; ++h) {
      uint16_t* tiles = st.tiles.data() + (h / p.group) * kChunks * 2 * kTileElems;
      for (int c = 0; c < kChunks; ++c) {
        const float* q = st.query.data() + h * D + 32 * c;
        const __m512 a = _mm512_loadu_ps(q), b = _mm512_loadu_ps(q + 16);
        const __m512i hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
        const __m512 hi_a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)), 16));
        const __m512 hi_b =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)), 16));
        const __m512i lo =
            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hi_b), _mm512_sub_ps(a, hi_a)));
        // dword r of the chunk (d = 2r, 2r + 1) goes to row r, column h of the tile.
        _mm512_i32scatter_epi32(tiles + (2 * c) * kTileElems + 2 * h, rows, hi, 1);
        _mm512_i32scatter_epi32(tiles + (2 * c + 1) * kTileElems + 2 * h, rows, lo, 1);
      }
    }
  }

  static void finish(const Problem&, RunningSoftmax&) {}

  template <typename scalar_t>
  static void scores(const Problem& p, RunningSoftmax& st, const scalar_t* k, int n) {
    const uint16_t* keys = reinterpret_cast<const uint16_t*>(k);
    int64_t token_stride = p.k_strides[1], head_stride = p.k_strides[2];
    if (n < kBlock) {  // a tile load reads 16 rows: copy the n that exist and zero the rest
      uint16_t* rows = st.tiles.data() + p.num_kv_heads * kChunks * 2 * kTileElems;
      for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh)
        for (int t = 0; t < kBlock; ++t) {
          uint16_t* row = rows + (kvh * kBlock + t) * D;
          if (t < n)
            std::memcpy(row, keys + t * token_stride + kvh * head_stride, D * sizeof(uint16_t));
          else
            std::memset(row, 0, D * sizeof(uint16_t));
        }
      keys = rows, token_stride = D, head_stride = kBlock * D;
    }
    const uint16_t* q_tiles = st.tiles.data();
    _tile_zero(0);
    for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh)
      for (int c = 0; c < kChunks; ++c) {
        const uint16_t* b = q_tiles + (kvh * kChunks + c) * 2 * kTileElems;
        _tile_loadd(1, keys + kvh * head_stride + 32 * c, token_stride * sizeof(uint16_t));
        _tile_loadd(2, b, 64);
        _tile_loadd(3, b + kTileElems, 64);
        _tile_dpbf16ps(0, 1, 2);
        _tile_dpbf16ps(0, 1, 3);
      }
    _tile_stored(0, st.probs.data(), kBlock * sizeof(float));
  }

  static void softmax(const Problem&, RunningSoftmax& st, int n) {
    float* rows = st.probs.data();  // [token][head]
    __m512 peak = _mm512_loadu_ps(st.max.data());
    __m512 block = _mm512_set1_ps(kNoScore);
    for (int t = 0; t < n; ++t) block = _mm512_max_ps(block, _mm512_loadu_ps(rows + t * kBlock));
    __m512 sum = _mm512_loadu_ps(st.sum.data());
    __m512 rescale = _mm512_set1_ps(1.0f);
    if (_mm512_cmp_ps_mask(block, peak, _CMP_GT_OQ)) {  // the running max rarely moves after the first blocks
      const __m512 grown = _mm512_max_ps(peak, block);
      rescale = exp2_ps(_mm512_sub_ps(peak, grown));
      sum = _mm512_mul_ps(sum, rescale);
      peak = grown;
      _mm512_storeu_ps(st.max.data(), peak);
    }
    _mm512_storeu_ps(st.rescale.data(), rescale);
    for (int t = 0; t < n; ++t) {
      const __m512 prob = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(rows + t * kBlock), peak));
      _mm512_storeu_ps(rows + t * kBlock, prob);
      sum = _mm512_add_ps(sum, prob);
    }
    _mm512_storeu_ps(st.sum.data(), sum);
  }

  template <typename scalar_t>
  static void values(const Problem& p, RunningSoftmax& st, const scalar_t* v, int n) {
    Avx512Ops<ND>::values_from(p, st, v, n, 1, kBlock);
  }
};
#endif

// Pulls n tokens' key and value rows (every kv head) into L1 ahead of use: the hardware prefetchers alone leave
// ~15% on the table (measured), as the heavy per-block compute keeps the out-of-order window from reaching the next
// block's rows. Inline asm, because GCC 12 deletes loops of _mm_prefetch as side-effect free.
template <typename scalar_t>
inline void prefetch_rows(const Problem& p, const scalar_t* k, const scalar_t* v, int64_t n) {
#if defined(__x86_64__)
  const int64_t row_bytes = p.head_dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      const char* key = reinterpret_cast<const char*>(k + t * p.k_strides[1] + kvh * p.k_strides[2]);
      const char* value = reinterpret_cast<const char*>(v + t * p.v_strides[1] + kvh * p.v_strides[2]);
      for (int64_t offset = 0; offset < row_bytes; offset += 64) {
        asm volatile("prefetcht0 %0" : : "m"(key[offset]));
        asm volatile("prefetcht0 %0" : : "m"(value[offset]));
      }
    }
#endif
}

// Where a thread goes next: the first tokens of its next segment (n = 0 when there is none).
template <typename scalar_t>
struct NextRows {
  const scalar_t *k = nullptr, *v = nullptr;
  int64_t n = 0;
};

// Runs one segment through the online softmax; k, v point at its slot's token 0. Each block first prefetches the
// next one, the last block the next segment's first, never a row past either context.
template <typename Ops, typename scalar_t>
void attend_segment(const Problem& p, RunningSoftmax& st, const scalar_t* k, const scalar_t* v, int64_t begin,
                    int64_t end, NextRows<scalar_t> next) {
  Ops::template start<scalar_t>(p, st);
  for (int64_t t0 = begin; t0 < end; t0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - t0));
    const int64_t ahead = t0 + kBlock;
    if (ahead < end)
      prefetch_rows(p, k + ahead * p.k_strides[1], v + ahead * p.v_strides[1], std::min<int64_t>(kBlock, end - ahead));
    else
      prefetch_rows(p, next.k, next.v, std::min<int64_t>(kBlock, next.n));
    Ops::scores(p, st, k + t0 * p.k_strides[1], n);
    Ops::softmax(p, st, n);
    Ops::values(p, st, v + t0 * p.v_strides[1], n);
  }
  Ops::finish(p, st);
}

// Cuts the batch's tokens into `parts` runs of near-equal length, each a list of per-sequence segments.
std::vector<Segment> plan_segments(const int64_t* lens, int64_t batch, int64_t parts, std::vector<int64_t>& first,
                                   int64_t& num_partials) {
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) total += lens[b];
  std::vector<Segment> segments;
  first.assign(parts + 1, 0);
  num_partials = 0;
  int64_t seq = 0, pos = 0, done = 0;
  for (int64_t part = 0; part < parts; ++part) {
    first[part] = static_cast<int64_t>(segments.size());
    const int64_t stop = total * (part + 1) / parts;
    while (done < stop) {
      const int64_t take = std::min(stop - done, lens[seq] - pos);
      const bool whole = pos == 0 && take == lens[seq];
      segments.push_back({seq, pos, pos + take, whole ? -1 : num_partials++});
      pos += take;
      done += take;
      if (pos == lens[seq]) {
        ++seq;
        pos = 0;
      }
    }
  }
  first[parts] = static_cast<int64_t>(segments.size());
  return segments;
}

// Merges the partial softmaxes of one split sequence's pieces [first, last) into out [H, D].
void merge_pieces(const Segment* first, const Segment* last, int64_t H, int64_t D, const float* part_max,
                  const float* part_sum, const float* part_acc, float* out) {
  for (int64_t h = 0; h < H; ++h) {
    float peak = kNoScore, total = 0.0f;
    for (const Segment* s = first; s != last; ++s) peak = std::max(peak, part_max[s->partial * H + h]);
    float* o = out + h * D;
    std::fill(o, o + D, 0.0f);
    for (const Segment* s = first; s != last; ++s) {
      const int64_t at = s->partial * H + h;
      const float weight = std::exp2(part_max[at] - peak);
      total += weight * part_sum[at];
      for (int64_t d = 0; d < D; ++d) o[d] += weight * part_acc[at * D + d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= total;
  }
}

template <typename Ops, typename scalar_t>
void decode_attention_kernel(const Problem& p, const float* q, const scalar_t* k_cache, const scalar_t* v_cache,
                             const int64_t* slots, const int64_t* lens, int64_t batch, float* out) {
  const int64_t H = p.num_heads, D = p.head_dim;
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) total += lens[b];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kMinTokensPerPart));
  std::vector<int64_t> first;
  int64_t num_partials = 0;
  const std::vector<Segment> segments = plan_segments(lens, batch, parts, first, num_partials);
  std::vector<float> part_max(num_partials * H), part_sum(num_partials * H), part_acc(num_partials * H * D);

  auto run_part = [&](int64_t part) {
    RunningSoftmax st(p);
    Ops::begin_part();
    for (int64_t i = first[part]; i < first[part + 1]; ++i) {
      const Segment& seg = segments[i];
      NextRows<scalar_t> next;
      if (i + 1 < first[part + 1]) {
        const Segment& after = segments[i + 1];
        next.k = k_cache + slots[after.seq] * p.k_strides[0] + after.begin * p.k_strides[1];
        next.v = v_cache + slots[after.seq] * p.v_strides[0] + after.begin * p.v_strides[1];
        next.n = after.end - after.begin;
      }
      st.start(p, q + seg.seq * H * D);
      attend_segment<Ops>(p, st, k_cache + slots[seg.seq] * p.k_strides[0], v_cache + slots[seg.seq] * p.v_strides[0],
                          seg.begin, seg.end, next);
      if (seg.partial >= 0) {
        std::copy(st.max.begin(), st.max.begin() + H, part_max.begin() + seg.partial * H);
        std::copy(st.sum.begin(), st.sum.begin() + H, part_sum.begin() + seg.partial * H);
        std::copy(st.acc.begin(), st.acc.end(), part_acc.begin() + seg.partial * H * D);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        const float inv = 1.0f / st.sum[h];
        for (int64_t d = 0; d < D; ++d) out[(seg.seq * H + h) * D + d] = st.acc[h * D + d] * inv;
      }
    }
    Ops::end_part();
  };
  if (parts == 1) {
    run_part(0);
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) run_part(part);
    });
  }
  for (size_t i = 0; i < segments.size();) {  // split sequences' pieces are consecutive in `segments`
    size_t j = i + 1;
    while (j < segments.size() && segments[j].seq == segments[i].seq) ++j;
    if (segments[i].partial >= 0)
      merge_pieces(&segments[i], &segments[0] + j, H, D, part_max.data(), part_sum.data(), part_acc.data(),
                   out + segments[i].seq * H * D);
    i = j;
  }
}

template <typename scalar_t>
void dispatch_head_dim(const Problem& p, const float* q, const scalar_t* k, const scalar_t* v, const int64_t* slots,
                       const int64_t* lens, int64_t batch, float* out) {
#if defined(FUSEDSERVE_DECODE_AMX)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (p.num_heads <= kBlock && amx_usable()) {
      switch (p.head_dim) {
        case 32: return decode_attention_kernel<AmxBf16Ops<2>>(p, q, k, v, slots, lens, batch, out);
        case 64: return decode_attention_kernel<AmxBf16Ops<4>>(p, q, k, v, slots, lens, batch, out);
        case 96: return decode_attention_kernel<AmxBf16Ops<6>>(p, q, k, v, slots, lens, batch, out);
        case 128: return decode_attention_kernel<AmxBf16Ops<8>>(p, q, k, v, slots, lens, batch, out);
        case 256: return decode_attention_kernel<AmxBf16Ops<16>>(p, q, k, v, slots, lens, batch, out);
        default: break;
      }
    }
  }
#endif
#if defined(__AVX512F__)
  switch (p.head_dim) {
    case 32: return decode_attention_kernel<Avx512Ops<2>>(p, q, k, v, slots, lens, batch, out);
    case 64: return decode_attention_kernel<Avx512Ops<4>>(p, q, k, v, slots, lens, batch, out);
    case 80: return decode_attention_kernel<Avx512Ops<5>>(p, q, k, v, slots, lens, batch, out);
    case 96: return decode_attention_kernel<Avx512Ops<6>>(p, q, k, v, slots, lens, batch, out);
    case 128: return decode_attention_kernel<Avx512Ops<8>>(p, q, k, v, slots, lens, batch, out);
    case 256: return decode_attention_kernel<Avx512Ops<16>>(p, q, k, v, slots, lens, batch, out);
    default: break;
  }
#endif
  decode_attention_kernel<ScalarOps>(p, q, k, v, slots, lens, batch, out);
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
  TORCH_CHECK(slots.numel() == q.size(0) && context_lens.numel() == q.size(0), "slots/lens: one per query row");
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
  const Problem problem{num_heads,
                        num_kv_heads,
                        num_heads / num_kv_heads,
                        head_dim,
                        {key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)},
                        {value_cache.stride(0), value_cache.stride(1), value_cache.stride(2)},
                        static_cast<float>(scale) * kLog2e};
  auto out = torch::empty_like(q);
  if (batch == 0) return out;
  if (key_cache.scalar_type() == torch::kFloat32) {
    dispatch_head_dim(problem, q.data_ptr<float>(), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(),
                      slot_ptr, len_ptr, batch, out.data_ptr<float>());
  } else if (key_cache.scalar_type() == torch::kBFloat16) {
    dispatch_head_dim(problem, q.data_ptr<float>(), key_cache.data_ptr<at::BFloat16>(),
                      value_cache.data_ptr<at::BFloat16>(), slot_ptr, len_ptr, batch, out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "unsupported KV cache dtype");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Batched decode attention over KV cache slots (CPU)");
}
