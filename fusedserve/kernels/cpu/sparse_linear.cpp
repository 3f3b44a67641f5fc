// Top-k sparse linear for small batches on the CPU: y[t] = sum_{i in topk(|x[t]|)} x[t, i] * W^T[i, :] (+ bias).
//
// Weights come input-major in column tiles (wtile [out / 64, in, 64]: tile b holds W^T[:, 64b:64b+64]), so a kept
// input channel is 256 (fp32) or 128 (bf16) contiguous bytes per tile and the kept rows of a tile are read in
// address order. For a
// batch the kernel reads each row of the union of kept channels once per tile and accumulates it, in registers,
// into every token of a group of up to six (AVX-512 where compiled for it, portable loops otherwise; a single
// token walks four tiles' kept rows together, see single_token_tiles);
// when the union is larger than `max_union_fraction` of the inputs it returns the top-k-masked input instead, for
// the caller's dense linear (same values up to rounding). Work is split over output tiles with at::parallel_for
// (torch's thread count); accumulation is fp32 for both weight types.
// Steps of 1-4 tokens over bf16 weights take a second layout instead, input-major rows [in, out], walked by
// rows_walk (topk_rows_linear for the sparse product over the union of kept rows, rows_linear for the dense one).
// This file never allocates per-channel weight copies and never reads weight rows of dropped channels.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// Counts keys >= value; a plain loop the compiler vectorises.
inline int64_t count_at_least(const uint32_t* key, int64_t in, uint32_t value) {
  uint32_t count = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(in); ++i) count += key[i] >= value ? 1u : 0u;
  return count;
}

// Marks the k largest-magnitude entries of one token's row in `keep`: exactly k, ties at the threshold broken by
// index order. The k-th largest magnitude is found bit by bit over the float bit patterns (non-negative floats
// order like their bits): 31 vectorised counting passes, no data-dependent branches to mispredict.
void select_topk(const float* x, int64_t in, int64_t k, std::vector<uint32_t>& key, uint8_t* keep) {
  if (k >= in) {
    std::fill(keep, keep + in, uint8_t{1});
    return;
  }
  if (k <= 0) return;
  uint32_t* keys = key.data();
  for (int64_t i = 0; i < in; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    keys[i] = bits & 0x7fffffffu;
  }
  uint32_t threshold = 0;  // grows to the largest value with at least k keys >= it: the k-th largest key
  for (int bit = 30; bit >= 0; --bit) {
    const uint32_t candidate = threshold | (1u << bit);
    if (count_at_least(keys, in, candidate) >= k) threshold = candidate;
  }
  int64_t need = k;
  for (int64_t i = 0; i < in; ++i) {
    keep[i] = keys[i] > threshold;
    need -= keep[i];
  }
  for (int64_t i = 0; i < in && need > 0; ++i)
    if (keys[i] == threshold) {
      keep[i] = 1;
      --need;
    }
}

constexpr int64_t kTile = 64;      // output columns per weight tile: [tiles, in, 64] (input-major inside a tile)
constexpr int64_t kMaxGroup = 6;   // tokens per register block: 6 tokens x 4 vectors = 24 accumulators
constexpr int64_t kPrefetch = 8;   // rows ahead to prefetch: kept rows are scattered, the hardware cannot guess

// One 64-column weight row as four fp32 vectors: fp32 rows load as they are; bf16 rows (uint16_t bit patterns)
// widen to fp32 by a 16-bit left shift, exact, so a bf16 tile reads half the bytes for the same arithmetic.
#if defined(__AVX512F__)
inline __m512 widen16(const uint16_t* r) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r))), 16));
}
inline void load_row(const float* r, __m512 (&v)[4]) {
  for (int i = 0; i < 4; ++i) v[i] = _mm512_loadu_ps(r + 16 * i);
}
inline void load_row(const uint16_t* r, __m512 (&v)[4]) {
  for (int i = 0; i < 4; ++i) v[i] = widen16(r + 16 * i);
}
#endif
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// For NT tokens and one tile: out[t][0:64] = sum_j coef[j][t] * tile[rows[j]][0:64], registers only.
template <int NT, typename W>
void tile_kernel(const W* tile, const int32_t* rows, const float* coef, int64_t coef_stride, int64_t num_rows,
                 float* acc /* [NT][64] */) {
#if defined(__AVX512F__)
  constexpr int kLines = static_cast<int>(kTile * sizeof(W) / 64);  // cache lines per weight row
  __m512 sum[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 4; ++v) sum[t][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < num_rows; ++j) {
    if (j + kPrefetch < num_rows) {
      const char* ahead = reinterpret_cast<const char*>(tile + static_cast<int64_t>(rows[j + kPrefetch]) * kTile);
      for (int line = 0; line < kLines; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
    __m512 r[4];
    load_row(tile + static_cast<int64_t>(rows[j]) * kTile, r);
    const float* a = coef + j * coef_stride;
    for (int t = 0; t < NT; ++t) {
      const __m512 at = _mm512_set1_ps(a[t]);
      for (int v = 0; v < 4; ++v) sum[t][v] = _mm512_fmadd_ps(at, r[v], sum[t][v]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + t * kTile + 16 * v, sum[t][v]);
#else
  float sum[NT][kTile] = {};
  for (int64_t j = 0; j < num_rows; ++j) {
    const W* r = tile + static_cast<int64_t>(rows[j]) * kTile;
    const float* a = coef + j * coef_stride;
    for (int t = 0; t < NT; ++t)
      for (int64_t c = 0; c < kTile; ++c) sum[t][c] += a[t] * widen(r[c]);
  }
  for (int t = 0; t < NT; ++t) std::copy(sum[t], sum[t] + kTile, acc + t * kTile);
#endif
}

template <typename W>
void run_group(int group, const W* tile, const int32_t* rows, const float* coef, int64_t coef_stride,
               int64_t num_rows, float* acc) {
  switch (group) {
    case 1: return tile_kernel<1>(tile, rows, coef, coef_stride, num_rows, acc);
    case 2: return tile_kernel<2>(tile, rows, coef, coef_stride, num_rows, acc);
    case 3: return tile_kernel<3>(tile, rows, coef, coef_stride, num_rows, acc);
    case 4: return tile_kernel<4>(tile, rows, coef, coef_stride, num_rows, acc);
    case 5: return tile_kernel<5>(tile, rows, coef, coef_stride, num_rows, acc);
    default: return tile_kernel<6>(tile, rows, coef, coef_stride, num_rows, acc);
  }
}

// One token over kTilesAtOnce neighbouring tiles: out[b][0:64] = sum_j coef[j] * tile_b[rows[j]][0:64]. A one-token
// step is bound by how many DRAM reads are in flight, not by arithmetic; walking the same kept rows of several
// tiles together keeps several streams going where one tile at a time keeps one (SmolLM2 decode at batch 1, 50%,
// 1 thread: 1.09x -> 1.28x over dense per step; 8 tiles at once measured the same, with 32 accumulators).
// Its prefetches go to L2 (T1), not L1: 32 lines ahead would fill L1's few miss buffers and stall the loads
// that are due now (-5% kernel time here at one token; the multi-token kernel measured slower with T1, so keeps T0).
constexpr int64_t kTilesAtOnce = 4;
#if defined(__AVX512F__)
template <typename W>
void single_token_tiles(const W* first_tile, int64_t tile_stride, const int32_t* rows, const float* coef,
                        int64_t num_rows, float* acc /* [kTilesAtOnce][64] */) {
  constexpr int kLines = static_cast<int>(kTile * sizeof(W) / 64);
  __m512 sum[kTilesAtOnce][4];
  for (int b = 0; b < kTilesAtOnce; ++b)
    for (int v = 0; v < 4; ++v) sum[b][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < num_rows; ++j) {
    if (j + kPrefetch < num_rows) {
      const int64_t ahead = static_cast<int64_t>(rows[j + kPrefetch]) * kTile;
      for (int b = 0; b < kTilesAtOnce; ++b) {
        const char* line = reinterpret_cast<const char*>(first_tile + b * tile_stride + ahead);
        for (int l = 0; l < kLines; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T1);
      }
    }
    const __m512 a = _mm512_set1_ps(coef[j]);
    const int64_t offset = static_cast<int64_t>(rows[j]) * kTile;
    for (int b = 0; b < kTilesAtOnce; ++b) {
      __m512 r[4];
      load_row(first_tile + b * tile_stride + offset, r);
      for (int v = 0; v < 4; ++v) sum[b][v] = _mm512_fmadd_ps(a, r[v], sum[b][v]);
    }
  }
  for (int b = 0; b < kTilesAtOnce; ++b)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + b * kTile + 16 * v, sum[b][v]);
}
#endif

// y[t, :] = sum over the union's rows of coef * tile rows (+ bias), all tiles, split over torch's threads.
template <typename W>
void accumulate_tiles(const W* tiles, int64_t in, int64_t out, int64_t tokens, const std::vector<int32_t>& rows,
                      const std::vector<float>& coef, const float* bp, float* yp) {
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  at::parallel_for(0, out / kTile, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float acc[std::max(kMaxGroup, kTilesAtOnce) * kTile];
    for (int64_t b = b0; b < b1;) {
#if defined(__AVX512F__)
      if (tokens == 1 && b + kTilesAtOnce <= b1) {
        single_token_tiles(tiles + b * in * kTile, in * kTile, rows.data(), coef.data(), num_rows, acc);
        for (int64_t c = 0; c < kTilesAtOnce * kTile; ++c) yp[b * kTile + c] = acc[c] + (bp ? bp[b * kTile + c] : 0.0f);
        b += kTilesAtOnce;
        continue;
      }
#endif
      const W* tile = tiles + b * in * kTile;
      // Token groups re-read the tile's kept rows; after the first group they come from L2.
      for (int64_t t0 = 0; t0 < tokens; t0 += kMaxGroup) {
        const int group = static_cast<int>(std::min<int64_t>(kMaxGroup, tokens - t0));
        run_group(group, tile, rows.data(), coef.data() + t0, tokens, num_rows, acc);
        for (int t = 0; t < group; ++t) {
          float* dst = yp + (t0 + t) * out + b * kTile;
          for (int64_t c = 0; c < kTile; ++c) dst[c] = acc[t * kTile + c] + (bp ? bp[b * kTile + c] : 0.0f);
        }
      }
      ++b;
    }
  });
}

// The row walk, over an input-major bf16 copy w [in, out] (row i = W^T[i, :], contiguous): y = sum over the kept
// rows j of x[j] * w[j, :] (for up to four tokens at once, see rows_walk). Each kept channel is one run of out * 2 contiguous bytes, so the dropped channels are whole
// runs the walk never touches, where the 64-column tiles interleave kept and dropped 128-byte rows on every page
// and the hardware prefetchers fetch both. The kept rows are split into kRowStreams equal chunks walked in
// lockstep (one row of each per step): several ascending streams keep more reads in flight than one. The hardware
// cannot guess where a stream's next kept run starts, so each stream has a software cursor that prefetches its own
// kept runs (kRowsPrefetchLines lines ahead in all, into L2). SmolLM2 layer at 50%, 1 thread, from memory: 289 us
// with four streams, 349 with one, 431 on the tiles, 454 dense.
constexpr int kRowStreams = 4;
constexpr int64_t kRowsPrefetchLines = 64;

// Prefetches one stream's kept runs, a line at a time, ahead of its loads.
struct RunCursor {
  const uint16_t* w = nullptr;
  int64_t out = 0, lines = 0;
  const int32_t* rows = nullptr;
  int64_t num_rows = 0, row = 0, line = 0;
  inline void advance(int64_t count) {
    for (int64_t n = 0; n < count && row < num_rows; ++n) {
      const char* at = reinterpret_cast<const char*>(w + static_cast<int64_t>(rows[row]) * out);
      __builtin_prefetch(at + 64 * line, 0, 2);  // read, into L2 (T1)
      if (++line == lines) {
        line = 0;
        ++row;
      }
    }
  }
};

inline void add_run(const uint16_t* run, float a, int64_t out, float* y) {
  for (int64_t c = 0; c < out; ++c) y[c] += a * widen(run[c]);
}

// y[t] = sum over the kept rows j of coef[j][t] * w[rows[j], :] for NT tokens (coef [num_rows][NT], 0 where token t
// dropped row j; y [NT][out]): each run is read once for all tokens, as the tiles' walk does for a batch.
template <int NT>
void rows_walk(const uint16_t* w, int64_t out, const float* coef, const int32_t* rows, int64_t num_rows, float* y) {
  std::fill(y, y + NT * out, 0.0f);
  int64_t begin[kRowStreams + 1];
  for (int s = 0; s <= kRowStreams; ++s) begin[s] = num_rows * s / kRowStreams;
  int64_t done = 0;  // rows walked in lockstep; the rest (chunks longer than the shortest) go one by one below
#if defined(__AVX512F__)
  if (out % 32 == 0) {
    const int64_t lines = out * static_cast<int64_t>(sizeof(uint16_t)) / 64;
    RunCursor cursor[kRowStreams];
    for (int s = 0; s < kRowStreams; ++s) {
      cursor[s] = RunCursor{w, out, lines, rows + begin[s], begin[s + 1] - begin[s]};
      cursor[s].advance(kRowsPrefetchLines / kRowStreams);
    }
    done = begin[1] - begin[0];
    for (int64_t j = 0; j < done; ++j) {
      const uint16_t* run[kRowStreams];
      __m512 a[kRowStreams][NT];
      for (int s = 0; s < kRowStreams; ++s) {
        run[s] = w + static_cast<int64_t>(rows[begin[s] + j]) * out;
        for (int t = 0; t < NT; ++t) a[s][t] = _mm512_set1_ps(coef[(begin[s] + j) * NT + t]);
      }
      for (int64_t c = 0; c < out; c += 32) {
        for (int s = 0; s < kRowStreams; ++s) cursor[s].advance(1);  // a line ahead per line loaded, per stream
        __m512 r[kRowStreams][2];
        for (int s = 0; s < kRowStreams; ++s) {
          r[s][0] = widen16(run[s] + c);
          r[s][1] = widen16(run[s] + c + 16);
        }
        for (int t = 0; t < NT; ++t) {
          float* yt = y + t * out + c;
          __m512 lo = _mm512_loadu_ps(yt), hi = _mm512_loadu_ps(yt + 16);
          for (int s = 0; s < kRowStreams; ++s) {
            lo = _mm512_fmadd_ps(a[s][t], r[s][0], lo);
            hi = _mm512_fmadd_ps(a[s][t], r[s][1], hi);
          }
          _mm512_storeu_ps(yt, lo);
          _mm512_storeu_ps(yt + 16, hi);
        }
      }
    }
  }
#endif
  for (int s = 0; s < kRowStreams; ++s)
    for (int64_t j = begin[s] + done; j < begin[s + 1]; ++j)
      for (int t = 0; t < NT; ++t) add_run(w + static_cast<int64_t>(rows[j]) * out, coef[j * NT + t], out, y + t * out);
}

void run_rows_walk(int tokens, const uint16_t* w, int64_t out, const float* coef, const int32_t* rows,
                   int64_t num_rows, float* y) {
  switch (tokens) {
    case 1: return rows_walk<1>(w, out, coef, rows, num_rows, y);
    case 2: return rows_walk<2>(w, out, coef, rows, num_rows, y);
    case 3: return rows_walk<3>(w, out, coef, rows, num_rows, y);
    default: return rows_walk<4>(w, out, coef, rows, num_rows, y);
  }
}

// y [T, out] fp32 = sum over `rows` of coef * tile rows (+ bias), for either tile dtype.
torch::Tensor tiles_product(const torch::Tensor& wtile, const torch::TensorOptions& options, int64_t tokens,
                            const std::vector<int32_t>& rows, const std::vector<float>& coef,
                            const c10::optional<torch::Tensor>& bias) {
  const int64_t in = wtile.size(1), out = wtile.size(0) * kTile;
  auto y = torch::empty({tokens, out}, options);
  const auto bias_c = bias.has_value() && bias->defined() ? bias->contiguous().to(torch::kFloat32) : torch::Tensor();
  const float* bp = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  if (wtile.scalar_type() == torch::kBFloat16)
    accumulate_tiles(reinterpret_cast<const uint16_t*>(wtile.data_ptr<at::BFloat16>()), in, out, tokens, rows, coef,
                     bp, y.data_ptr<float>());
  else
    accumulate_tiles(wtile.data_ptr<float>(), in, out, tokens, rows, coef, bp, y.data_ptr<float>());
  return y;
}

// Per-token keep masks [T][in] and the union of kept channels (sorted ascending: rows are read in address order).
struct KeptUnion {
  std::vector<uint8_t> keep;
  std::vector<int32_t> rows;
};
KeptUnion kept_union(const float* xp, int64_t tokens, int64_t in, int64_t k) {
  KeptUnion kept{std::vector<uint8_t>(static_cast<size_t>(tokens * in), 0), {}};
  std::vector<uint32_t> key(static_cast<size_t>(in));
  for (int64_t t = 0; t < tokens; ++t) select_topk(xp + t * in, in, k, key, kept.keep.data() + t * in);
  // Branch-free compaction: which channels a token keeps is close to random, so a branch per channel would
  // mispredict about half the time (measured: this loop took twice the selection's time with one).
  kept.rows.resize(static_cast<size_t>(in));
  int32_t* rows = kept.rows.data();
  int64_t count = 0;
  for (int64_t i = 0; i < in; ++i) {
    uint8_t any = 0;
    for (int64_t t = 0; t < tokens; ++t) any |= kept.keep[t * in + i];
    rows[count] = static_cast<int32_t>(i);
    count += any;
  }
  kept.rows.resize(static_cast<size_t>(count));
  return kept;
}

// Coefficients row-major over the union: coef[j][t] = x[t, rows[j]] if token t kept it, else 0.
std::vector<float> union_coefficients(const float* xp, const KeptUnion& kept, int64_t tokens, int64_t in) {
  const int64_t num_rows = static_cast<int64_t>(kept.rows.size());
  std::vector<float> coef(static_cast<size_t>(num_rows * tokens));
  for (int64_t j = 0; j < num_rows; ++j)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t n = t * in + kept.rows[j];
      coef[j * tokens + t] = kept.keep[n] ? xp[n] : 0.0f;
    }
  return coef;
}

// Checks both entries' arguments and returns x as contiguous fp32 [T, in].
torch::Tensor widened_input(const torch::Tensor& x, const torch::Tensor& wtile) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be [T, in] float32 or bfloat16");
  const bool bf16_tiles = wtile.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(wtile.dim() == 3 && wtile.size(2) == kTile && wtile.is_contiguous() &&
                  (bf16_tiles || wtile.scalar_type() == torch::kFloat32),
              "wtile must be [out / 64, in, 64] float32 or bfloat16, contiguous");
  TORCH_CHECK(wtile.size(1) == x.size(1), "wtile rows must equal x columns");
  return x.to(torch::kFloat32).contiguous();
}

}  // namespace

// Returns (y [T, out], true) from the sparse path, or (TopK_k(x) [T, in], false) when the union of kept channels
// exceeds max_union_fraction * in: the caller then runs its dense linear on the masked input. x [T, in] fp32 or
// bf16 (both results come back in x's dtype);
// wtile [out / 64, in, 64] fp32 or bf16 (accumulation is fp32 either way); bias [out] or None; k kept per token.
std::tuple<torch::Tensor, bool> topk_sparse_linear(const torch::Tensor& x, const torch::Tensor& wtile,
                                                   const c10::optional<torch::Tensor>& bias, int64_t k,
                                                   double max_union_fraction) {
  // A bf16 input (a mixed-precision model's blocks) is widened here and the result rounded back below: two
  // conversions inside one call instead of two more torch ops around every sparse linear of a decode step.
  const auto input_dtype = x.scalar_type();
  const auto xc = widened_input(x, wtile);
  const int64_t tokens = xc.size(0), in = xc.size(1);
  k = std::max<int64_t>(0, std::min<int64_t>(k, in));
  const float* xp = xc.data_ptr<float>();

  const KeptUnion kept = kept_union(xp, tokens, in, k);
  const std::vector<uint8_t>& keep = kept.keep;
  const std::vector<int32_t>& rows = kept.rows;
  const int64_t num_rows = static_cast<int64_t>(rows.size());

  if (static_cast<double>(num_rows) > max_union_fraction * static_cast<double>(in)) {
    auto masked = torch::empty_like(xc);
    float* mp = masked.data_ptr<float>();
    for (int64_t n = 0; n < tokens * in; ++n) mp[n] = keep[n] ? xp[n] : 0.0f;
    return {masked.to(input_dtype), false};
  }

  auto y = tiles_product(wtile, xc.options(), tokens, rows, union_coefficients(xp, kept, tokens, in), bias);
  return {y.to(input_dtype), true};
}

constexpr int64_t kRowsMaxTokens = 4;  // the row walk's register blocks: 1-4 tokens

// y [T, out] fp32 = sum over `rows` of coef * w_rows rows (+ bias), threads splitting the rows, not the columns,
// so every run stays whole (column halves measured no faster than the tiles at 2 threads); each thread sums into
// its own buffer and the buffers are added at the end.
torch::Tensor rows_product(const torch::Tensor& xc, const torch::Tensor& w_rows, const std::vector<int32_t>& rows,
                           const std::vector<float>& coef, const c10::optional<torch::Tensor>& bias) {
  const int64_t tokens = xc.size(0), out = w_rows.size(1);
  auto y = torch::empty({tokens, out}, xc.options());
  float* yp = y.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w_rows.data_ptr<at::BFloat16>());
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_rows / 16));
  const int64_t size = tokens * out;
  std::vector<float> partial(static_cast<size_t>((parts - 1) * size));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = num_rows * p / parts, r1 = num_rows * (p + 1) / parts;
      run_rows_walk(static_cast<int>(tokens), wp, out, coef.data() + r0 * tokens, rows.data() + r0, r1 - r0,
                    p == 0 ? yp : partial.data() + (p - 1) * size);
    }
  });
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t c = 0; c < size; ++c) yp[c] += partial[(p - 1) * size + c];
  if (bias.has_value() && bias->defined()) y += bias->to(torch::kFloat32).view({1, out});
  return y;
}

// Checks both row-walk entries' arguments and returns x as contiguous fp32 [T, in].
torch::Tensor rows_input(const torch::Tensor& x, const torch::Tensor& w_rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kRowsMaxTokens &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be [T, in] float32 or bfloat16 with 1 <= T <= 4");
  TORCH_CHECK(w_rows.dim() == 2 && w_rows.scalar_type() == torch::kBFloat16 && w_rows.is_contiguous() &&
                  w_rows.size(0) == x.size(1),
              "w_rows must be [in, out] bfloat16, contiguous, with in = x's columns");
  const auto xc = x.to(torch::kFloat32).contiguous();
  return xc;
}

// y = TopK_k(x) @ W^T + b for up to kRowsMaxTokens tokens over an input-major bf16 copy w_rows [in, out] (see
// rows_walk): x [T, in] fp32 or bf16, y [T, out] in x's dtype. The union of the tokens' kept channels is walked once.
torch::Tensor topk_rows_linear(const torch::Tensor& x, const torch::Tensor& w_rows,
                               const c10::optional<torch::Tensor>& bias, int64_t k) {
  const auto xc = rows_input(x, w_rows);
  const int64_t tokens = xc.size(0), in = xc.size(1);
  k = std::max<int64_t>(0, std::min<int64_t>(k, in));
  const float* xp = xc.data_ptr<float>();
  const KeptUnion kept = kept_union(xp, tokens, in, k);
  return rows_product(xc, w_rows, kept.rows, union_coefficients(xp, kept, tokens, in), bias).to(x.scalar_type());
}

// The dense product y = (x + addend) @ W^T + b of up to kRowsMaxTokens tokens over the input-major bf16 copy w_rows
// [in, out]: the same walk with every row kept (no selection). x [T, in] fp32 or bf16, y [T, out] in x's dtype;
// `addend` (optional, x's shape, fp32 or bf16) is summed into the coefficients, so a residual add before a linear
// (LaRoSA's adapter after an MLP block) costs no call of its own. Against the 64-column tiles' walk: equal at one
// token, 0.83-0.84 of its time at 2-4 tokens (SmolLM2's four linears of a layer, 1 thread).
torch::Tensor rows_linear(const torch::Tensor& x, const torch::Tensor& w_rows, const c10::optional<torch::Tensor>& bias,
                          const c10::optional<torch::Tensor>& addend) {
  const auto xc = rows_input(x, w_rows);
  const int64_t tokens = xc.size(0), in = xc.size(1);
  torch::Tensor ac;
  if (addend.has_value() && addend->defined()) {
    TORCH_CHECK(addend->sizes() == x.sizes(), "addend must have x's shape");
    ac = addend->to(torch::kFloat32).contiguous();
  }
  std::vector<int32_t> rows(static_cast<size_t>(in));
  std::vector<float> coef(static_cast<size_t>(in * tokens));  // coef[j][t] = x[t, j] (+ addend[t, j])
  const float* xp = xc.data_ptr<float>();
  const float* ap = ac.defined() ? ac.data_ptr<float>() : nullptr;
  for (int64_t j = 0; j < in; ++j) {
    rows[j] = static_cast<int32_t>(j);
    for (int64_t t = 0; t < tokens; ++t) coef[j * tokens + t] = xp[t * in + j] + (ap != nullptr ? ap[t * in + j] : 0.0f);
  }
  return rows_product(xc, w_rows, rows, coef, bias).to(x.scalar_type());
}

// LaRoSA's entry into a layer, for up to kRowsMaxTokens tokens, in one call: hidden' = (x + addend) @ A over A's
// input-major bf16 rows (rows_linear), returned fp32, and hidden' / rms(hidden') (* norm_weight) in fp32 or bf16,
// the layer's normalised input. At decode sizes a separate norm call costs ~10 us of dispatch per layer.
std::tuple<torch::Tensor, torch::Tensor> rows_linear_rms_norm(const torch::Tensor& x, const torch::Tensor& w_rows,
                                                              const c10::optional<torch::Tensor>& addend,
                                                              const c10::optional<torch::Tensor>& norm_weight,
                                                              double eps, bool bf16_out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be float32: the residual stream");
  const auto y = rows_linear(x, w_rows, c10::nullopt, addend);
  const int64_t tokens = y.size(0), d = y.size(1);
  torch::Tensor wf;
  if (norm_weight.has_value() && norm_weight->defined()) {
    TORCH_CHECK(norm_weight->numel() == d, "norm_weight must have one entry per output column");
    wf = norm_weight->to(torch::kFloat32).contiguous();
  }
  const float* wp = wf.defined() ? wf.data_ptr<float>() : nullptr;
  auto out = torch::empty({tokens, d}, y.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  const float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = yp + t * d;
    float squares = 0.0f;
    for (int64_t i = 0; i < d; ++i) squares += row[i] * row[i];
    const float inverse_rms = 1.0f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) {
      const float v = row[i] * inverse_rms * (wp != nullptr ? wp[i] : 1.0f);
      if (bf16_out)
        out.data_ptr<at::BFloat16>()[t * d + i] = static_cast<at::BFloat16>(v);
      else
        out.data_ptr<float>()[t * d + i] = v;
    }
  }
  return {y, out};
}

// The top-k-masked input: x with all but the k largest-magnitude entries of each row set to zero (any row count).
torch::Tensor topk_mask(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [T, in] float32");
  const auto xc = x.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1);
  k = std::max<int64_t>(0, std::min<int64_t>(k, in));
  auto masked = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* mp = masked.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> key(static_cast<size_t>(in));
    std::vector<uint8_t> keep(static_cast<size_t>(in));
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(keep.begin(), keep.end(), uint8_t{0});
      select_topk(xp + t * in, in, k, key, keep.data());
      for (int64_t i = 0; i < in; ++i) mp[t * in + i] = keep[i] ? xp[t * in + i] : 0.0f;
    }
  });
  return masked;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_sparse_linear", &topk_sparse_linear, "top-k sparse linear (tiled input-major weights) or the masked input");
  m.def("topk_rows_linear", &topk_rows_linear, "top-k sparse linear of 1-4 tokens over input-major bf16 rows");
  m.def("rows_linear", &rows_linear, "dense (x + addend) @ W^T + b of 1-4 tokens over input-major bf16 rows",
        py::arg("x"), py::arg("w_rows"), py::arg("bias"), py::arg("addend") = py::none());
  m.def("rows_linear_rms_norm", &rows_linear_rms_norm,
        "(x + addend) @ W^T over input-major bf16 rows and its RMSNorm, for 1-4 tokens (LaRoSA's layer entry)",
        py::arg("x"), py::arg("w_rows"), py::arg("addend"), py::arg("norm_weight"), py::arg("eps"),
        py::arg("bf16_out"));
  m.def("topk_mask", &topk_mask, "zero all but the k largest-magnitude entries of each row");
}
