// One token per row of a decode step's (already edited) logits [B, V]: the first argmax for a greedy row, else
// temperature, min_p, top_k and top_p truncation and one inverse-CDF draw with the row's given uniform.
//
// The rule is the sampler's; fusedserve/engine/sampler_rows.py holds its pure-torch twin and the tests hold the
// two to the same tokens for the same uniforms:
//   e = exp((x - max) * inv_temp) in float32 (1.0 at the best token, 0 for -inf);
//   survivors are e >= max(min_p, the k-th largest e);
//   the nucleus is every survivor >= t, t being the weight at which the survivors' running mass, largest first,
//   first reaches top_p of their total (ties of t stay in);
//   the draw walks the nucleus in vocabulary order, summing in float64, to the first id whose running mass exceeds
//   u * total (strictly, so a zero weight is never picked).
// Nothing is sorted whole. Blocks of 64 ids keep their sum and maximum; only blocks whose maximum reaches a
// threshold are searched; the k-th largest starts from the k-th largest block maximum; the top-p threshold comes
// from a histogram of the candidates' mass, and only the one bin it falls in is sorted. Rows run in parallel
// (the calling thread and helpers from torch's inter-op pool), each in its thread's scratch.
// This file never writes the logits and never draws a random number.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;         // ids per block
constexpr float kExpFloor = -87.0f;    // exp below this is 0: never a denormal, and exp(-inf) is exactly 0
constexpr int64_t kSortDirect = 128;   // at most this many top-p candidates are sorted instead of histogrammed
constexpr int kBinShift = 19;          // top-p histogram bins: the float's bits >> 19 (16 bins per power of two)
constexpr uint32_t kNegInfBits = 0xff800000u;
// A helper thread per this many rows (a row costs ~20-60 us, waking a helper ~10-20 us).
constexpr int64_t kRowsPerHelper = 4;

struct RowScratch {
  std::vector<float> e;          // [nb * 64] weights, zero past the vocabulary
  std::vector<float> block_sum;  // [nb] sums of e
  std::vector<float> block_max;  // [nb] maxima of x, then of e
  std::vector<float> values;     // candidates' weights, in vocabulary order
  std::vector<int32_t> ids;      // candidates' ids
  std::vector<float> work;       // selection scratch
  std::vector<double> bins;      // top-p histogram

  void reserve(int64_t nb) {
    const size_t n = static_cast<size_t>(nb * kBlock);
    if (e.size() >= n) return;
    e.resize(n);
    values.resize(n + 16);  // + a vector of slack for whole-vector stores
    ids.resize(n + 16);
    work.resize(n);
    block_sum.resize(nb);
    block_max.resize(nb);
  }
};

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// The smallest float f with f >= d (so e >= f exactly when double(e) >= d); 0 for d <= 0.
inline float float_at_least(double d) {
  if (!(d > 0.0)) return 0.0f;
  float f = static_cast<float>(d);
  if (static_cast<double>(f) < d) f = std::nextafter(f, std::numeric_limits<float>::max());
  return f;
}

#if defined(__AVX512F__)
// exp(y) for y <= 0 (Cephes' float polynomial, about 1 ulp); exactly 1 at 0 and 0 below kExpFloor or for -inf.
inline __m512 exp_nonpositive(__m512 y) {
  const __m512 floor_v = _mm512_set1_ps(kExpFloor);
  const __mmask16 in_range = _mm512_cmp_ps_mask(y, floor_v, _CMP_GE_OQ);
  y = _mm512_max_ps(y, floor_v);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(in_range, _mm512_scalef_ps(p, n));
}

// Lanes of the 16 ids from `at` that lie inside the vocabulary.
inline __mmask16 lanes_inside(int64_t at, int64_t vocab) {
  const int64_t left = vocab - at;
  return left >= 16 ? static_cast<__mmask16>(0xffff) : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1u);
}

// The 16 values from `at`; -inf for ids past the vocabulary (only the last block has any).
inline __m512 load_logits(const float* x, int64_t at, int64_t vocab, bool last_block) {
  if (!last_block) return _mm512_loadu_ps(x + at);
  const __m512 neg_inf = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kNegInfBits)));
  return _mm512_mask_loadu_ps(neg_inf, lanes_inside(at, vocab), x + at);
}

// Per-block maxima of x into block_max; returns the row's maximum.
float block_maxima(const float* x, int64_t vocab, int64_t nb, float* block_max) {
  __m512 row = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kNegInfBits)));
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t at = b * kBlock;
    const bool last = at + kBlock > vocab;
    const __m512 m = _mm512_max_ps(
        _mm512_max_ps(load_logits(x, at, vocab, last), load_logits(x, at + 16, vocab, last)),
        _mm512_max_ps(load_logits(x, at + 32, vocab, last), load_logits(x, at + 48, vocab, last)));
    block_max[b] = _mm512_reduce_max_ps(m);
    row = _mm512_max_ps(row, m);
  }
  return _mm512_reduce_max_ps(row);
}

// e = exp((x - row_max) * inv_temp) with per-block sums and maxima, replacing x's block maxima (s.block_max) by
// e's; a block whose maximum is too far below row_max for any weight to be positive is zeroed without an exp.
// Returns the row's total (float64).
double weigh_row(const float* x, int64_t vocab, int64_t nb, float row_max, float inv_temp, RowScratch& s) {
  float* const e = s.e.data();
  float* const block_sum = s.block_sum.data();
  float* const block_max = s.block_max.data();
  const __m512 shift = _mm512_set1_ps(row_max), scale = _mm512_set1_ps(inv_temp);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t at = b * kBlock;
    if ((block_max[b] - row_max) * inv_temp < kExpFloor) {  // block_max holds x's maxima: every weight is 0
      std::memset(e + at, 0, kBlock * sizeof(float));
      block_sum[b] = block_max[b] = 0.0f;
      continue;
    }
    const bool last = at + kBlock > vocab;
    __m512 w[4];
    for (int v = 0; v < 4; ++v) {
      const __m512 xv = load_logits(x, at + 16 * v, vocab, last);
      w[v] = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(xv, shift), scale));
      _mm512_storeu_ps(e + at + 16 * v, w[v]);
    }
    block_sum[b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(w[0], w[1]), _mm512_add_ps(w[2], w[3])));
    block_max[b] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(w[0], w[1]), _mm512_max_ps(w[2], w[3])));
    total += block_sum[b];
  }
  return total;
}

// Appends (e, id) for every e >= lo (lo > 0), in vocabulary order; only blocks whose maximum reaches lo are read.
// Compresses in registers and stores whole vectors (the buffers have a vector of slack past their end).
int64_t collect_at_least(RowScratch& s, int64_t nb, float lo) {
  const float* const e = s.e.data();
  const float* const block_max = s.block_max.data();
  float* const values = s.values.data();
  int32_t* const ids = s.ids.data();
  const __m512 lo_v = _mm512_set1_ps(lo);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (!(block_max[b] >= lo)) continue;
    for (int64_t at = b * kBlock; at < (b + 1) * kBlock; at += 16) {
      const __m512 w = _mm512_loadu_ps(e + at);
      const __mmask16 keep = _mm512_cmp_ps_mask(w, lo_v, _CMP_GE_OQ);
      const __m512i id = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(at)));
      _mm512_storeu_ps(values + count, _mm512_maskz_compress_ps(keep, w));
      _mm512_storeu_si512(ids + count, _mm512_maskz_compress_epi32(keep, id));
      count += __builtin_popcount(static_cast<unsigned>(keep));
    }
  }
  return count;
}
#else
float block_maxima(const float* x, int64_t vocab, int64_t nb, float* block_max) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float row = neg_inf;
  for (int64_t b = 0; b < nb; ++b) {
    float m = neg_inf;
    for (int64_t i = b * kBlock; i < std::min(vocab, (b + 1) * kBlock); ++i) m = std::max(m, x[i]);
    block_max[b] = m;
    row = std::max(row, m);
  }
  return row;
}

double weigh_row(const float* x, int64_t vocab, int64_t nb, float row_max, float inv_temp, RowScratch& s) {
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    if ((s.block_max[b] - row_max) * inv_temp < kExpFloor) {  // block_max holds x's maxima: every weight is 0
      std::fill(s.e.begin() + b * kBlock, s.e.begin() + (b + 1) * kBlock, 0.0f);
      s.block_sum[b] = s.block_max[b] = 0.0f;
      continue;
    }
    float sum = 0.0f, m = 0.0f;
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i) {
      const float y = i < vocab ? (x[i] - row_max) * inv_temp : kExpFloor - 1.0f;
      const float e = y >= kExpFloor ? std::exp(y) : 0.0f;
      s.e[i] = e;
      sum += e;
      m = std::max(m, e);
    }
    s.block_sum[b] = sum;
    s.block_max[b] = m;
    total += sum;
  }
  return total;
}

int64_t collect_at_least(RowScratch& s, int64_t nb, float lo) {
  int64_t count = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (!(s.block_max[b] >= lo)) continue;
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i)
      if (s.e[i] >= lo) {
        s.values[count] = s.e[i];
        s.ids[count++] = static_cast<int32_t>(i);
      }
  }
  return count;
}
#endif

// The first id holding the row's maximum m (argmax's answer), found through the block maxima of x.
int64_t first_index_of(const float* x, int64_t vocab, int64_t nb, const float* block_max, float m) {
  for (int64_t b = 0; b < nb; ++b) {
    if (block_max[b] != m) continue;
    for (int64_t i = b * kBlock; i < std::min(vocab, (b + 1) * kBlock); ++i)
      if (x[i] == m) return i;
  }
  return 0;  // only for a row holding NaN
}

// The k-th largest of values[0, n) (1 <= k <= n); reorders work, not values.
float kth_largest(const float* values, int64_t n, int64_t k, float* work) {
  std::copy(values, values + n, work);
  std::nth_element(work, work + (k - 1), work + n, std::greater<float>());
  return work[k - 1];
}

// The top-p threshold among the candidates (every weight that can be in the nucleus): going down from the
// largest, the first weight at which the running mass reaches target; the smallest candidate when rounding
// leaves the whole mass below target.
float nucleus_threshold(RowScratch& s, int64_t count, double target) {
  const float* values = s.values.data();
  float* work = s.work.data();
  if (count <= kSortDirect) {
    std::copy(values, values + count, work);
    std::sort(work, work + count, std::greater<float>());
    double running = 0.0;
    for (int64_t i = 0; i < count; ++i) {
      running += work[i];
      if (running >= target) return work[i];
    }
    return work[count - 1];
  }
  // Positive floats order like their bits, so bins of bits >> kBinShift are value ranges, highest bin largest.
  uint32_t low = std::numeric_limits<uint32_t>::max(), high = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t key = bits_of(values[i]) >> kBinShift;
    low = std::min(low, key);
    high = std::max(high, key);
  }
  s.bins.assign(high - low + 1, 0.0);
  double* const bins = s.bins.data();
  for (int64_t i = 0; i < count; ++i) bins[(bits_of(values[i]) >> kBinShift) - low] += values[i];
  double running = 0.0;
  int64_t bin = static_cast<int64_t>(high - low);
  for (; bin >= 0; --bin) {
    if (running + bins[bin] >= target) break;
    running += bins[bin];
  }
  if (bin < 0) return *std::min_element(values, values + count);
  const uint32_t key = static_cast<uint32_t>(bin) + low;
  int64_t n = 0;
  for (int64_t i = 0; i < count; ++i)
    if ((bits_of(values[i]) >> kBinShift) == key) work[n++] = values[i];
  std::sort(work, work + n, std::greater<float>());
  for (int64_t i = 0; i < n; ++i) {
    running += work[i];
    if (running >= target) return work[i];
  }
  return work[n - 1];
}

// A floor for the top-p nucleus from the block sums alone. Weights below L in block b sum to at most
// min(block_sum[b], 64 L); once those bounds total at most `tail` (the mass the nucleus may leave out), no
// weight below L is in the nucleus. Bisects (over float bit patterns) between `safe` (known to be a floor) and 1.
float nucleus_floor(const float* block_sum, int64_t nb, double tail, float safe) {
  const double budget = tail * 0.999;  // block sums are float: stay clear of their rounding
  const auto fits = [&](uint32_t level_bits) {
    float level;
    std::memcpy(&level, &level_bits, sizeof(level));
    const float cap = static_cast<float>(kBlock) * level;
    double bound = 0.0;
    for (int64_t b = 0; b < nb; ++b) bound += std::min(block_sum[b], cap);
    return bound <= budget;
  };
  uint32_t good = bits_of(safe), bad = bits_of(1.0f);
  if (good >= bad || !fits(good)) return safe;
  while (bad - good > 1) {
    const uint32_t mid = good + (bad - good) / 2;
    if (fits(mid))
      good = mid;
    else
      bad = mid;
  }
  float level;
  std::memcpy(&level, &good, sizeof(level));
  return level;
}

inline double draw_target(double total, double u) {
  return std::min(u * total, std::nextafter(total, 0.0));
}

// Sum of the values >= t among values[0, n).
inline double sum_at_least(const float* values, int64_t n, float t) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += values[i] >= t ? static_cast<double>(values[i]) : 0.0;
  return sum;
}

// Draw among the candidates with weight >= t (t > 0), in vocabulary order: chunks of 16 by their sums, then
// ids one by one inside the chunk that crosses the target.
int64_t draw_candidates(const RowScratch& s, int64_t count, float t, double u) {
  constexpr int64_t kChunk = 16;
  const float* const values = s.values.data();
  const double target = draw_target(sum_at_least(values, count, t), u);
  double running = 0.0;
  for (int64_t at = 0; at < count; at += kChunk) {
    const int64_t n = std::min(kChunk, count - at);
    const double chunk = sum_at_least(values + at, n, t);
    if (running + chunk <= target) {
      running += chunk;
      continue;
    }
    for (int64_t i = at; i < at + n; ++i) {
      if (!(values[i] >= t)) continue;
      running += values[i];
      if (running > target) return s.ids[i];
    }
  }
  for (int64_t i = count - 1; i > 0; --i)  // rounding ran past the end: the last candidate in the nucleus
    if (values[i] >= t) return s.ids[i];
  return s.ids[0];
}

// Draw over the whole row: a block by its sum, then ids one by one from there.
int64_t draw_whole_row(const RowScratch& s, int64_t vocab, int64_t nb, double total, double u) {
  const float* const e = s.e.data();
  const float* const block_sum = s.block_sum.data();
  const double target = draw_target(total, u);
  double running = 0.0;
  int64_t b = 0;
  for (; b < nb && running + block_sum[b] <= target; ++b) running += block_sum[b];
  int64_t last = -1;
  for (int64_t i = b * kBlock; i < vocab; ++i) {
    if (!(e[i] > 0.0f)) continue;
    running += e[i];
    last = i;
    if (running > target) return i;
  }
  if (last >= 0) return last;
  for (int64_t i = vocab - 1; i > 0; --i)  // rounding skipped past the last positive weight
    if (e[i] > 0.0f) return i;
  return 0;
}

int64_t sample_row(const float* x, int64_t vocab, float inv_temp, int64_t top_k, double top_p, double min_p,
                   double u, RowScratch& s) {
  const int64_t nb = (vocab + kBlock - 1) / kBlock;
  s.reserve(nb);
  const float row_max = block_maxima(x, vocab, nb, s.block_max.data());
  if (bits_of(row_max) == kNegInfBits) return -1;  // no finite logit: the caller decides
  if (!(inv_temp > 0.0f)) return first_index_of(x, vocab, nb, s.block_max.data(), row_max);
  const double total = weigh_row(x, vocab, nb, row_max, inv_temp, s);

  double keep_from = min_p > 0.0 ? min_p : 0.0;
  if (top_k > 0 && top_k < vocab) {
    // The k blocks with the largest maxima hold k weights >= their smallest maximum, so the k-th largest weight
    // is at least that: only weights from there up need selecting.
    float from = float_at_least(keep_from);
    if (top_k <= nb) from = std::max(from, kth_largest(s.block_max.data(), nb, top_k, s.work.data()));
    from = std::max(from, std::numeric_limits<float>::denorm_min());
    const int64_t count = collect_at_least(s, nb, from);
    if (count >= top_k)
      keep_from = std::max(keep_from, static_cast<double>(kth_largest(s.values.data(), count, top_k, s.work.data())));
  }
  const float survivors_from = float_at_least(keep_from);
  if (survivors_from == 0.0f && !(top_p < 1.0)) return draw_whole_row(s, vocab, nb, total, u);

  float nucleus_from = survivors_from;
  int64_t count;
  if (top_p < 1.0) {
    double mass = total;
    if (survivors_from > 0.0f) {
      count = collect_at_least(s, nb, survivors_from);
      mass = 0.0;
      const float* const values = s.values.data();
      for (int64_t i = 0; i < count; ++i) mass += values[i];
    } else {
      // Weights below (1 - top_p) * total / vocab sum to less than (1 - top_p) * total: never in the nucleus.
      // The block sums usually prove a much higher floor, which leaves far fewer candidates.
      const double tail = (1.0 - top_p) * total;
      const float safe = std::max(static_cast<float>(tail / static_cast<double>(vocab)),
                                  std::numeric_limits<float>::denorm_min());
      count = collect_at_least(s, nb, nucleus_floor(s.block_sum.data(), nb, tail, safe));
    }
    if (count > 0) nucleus_from = std::max(nucleus_from, nucleus_threshold(s, count, top_p * mass));
  } else {
    count = collect_at_least(s, nb, survivors_from);
  }
  if (count == 0) {  // only for out-of-range parameters (min_p > 1)
    block_maxima(x, vocab, nb, s.block_max.data());
    return first_index_of(x, vocab, nb, s.block_max.data(), row_max);
  }
  return draw_candidates(s, count, nucleus_from, u);
}

// This thread's scratch; out of line so that no caller is specialised on a thread-local address.
__attribute__((noinline)) RowScratch& thread_scratch() {
  thread_local RowScratch scratch;
  return scratch;
}

// One call's rows and their tokens. The calling thread and its helpers claim rows one at a time. A row's token
// depends only on its inputs, so once the claims run out the caller recomputes any row a helper has not finished
// yet instead of waiting for it (a helper descheduled mid-row must not stall the step); both store the same
// token. Helpers hold the batch, inputs included, by shared_ptr: one that runs late reads live memory, and what it
// stores is no longer read.
struct RowBatch {
  static constexpr int64_t kPending = std::numeric_limits<int64_t>::min();

  torch::Tensor logits, inv_temp, top_k, top_p, min_p, uniform;
  int64_t rows = 0, vocab = 0;
  std::unique_ptr<std::atomic<int64_t>[]> tokens;  // kPending until some thread stores the row's token
  std::atomic<int64_t> next{0};                     // the next unclaimed row

  int64_t sample(int64_t r, RowScratch& scratch) const {
    return sample_row(logits.data_ptr<float>() + r * vocab, vocab, inv_temp.data_ptr<float>()[r],
                      top_k.data_ptr<int64_t>()[r], top_p.data_ptr<double>()[r], min_p.data_ptr<double>()[r],
                      uniform.data_ptr<double>()[r], scratch);
  }
};

void drain(RowBatch& batch) {
  RowScratch& scratch = thread_scratch();
  for (int64_t r = batch.next.fetch_add(1); r < batch.rows; r = batch.next.fetch_add(1))
    batch.tokens[r].store(batch.sample(r, scratch), std::memory_order_release);
}

void check_row_param(const torch::Tensor& t, int64_t rows, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == rows && t.scalar_type() == dtype && t.is_contiguous(),
              name, " must be a contiguous CPU tensor [", rows, "] of ", c10::toString(dtype));
}

}  // namespace

// tokens [B] (int64) for logits [B, V] (float32); -1 for a row without a finite logit. Per row: inv_temp (float32,
// 0 = greedy), top_k (int64, off unless 0 < k < V), top_p and min_p (float64, off at 1 and 0), uniform (float64 in
// [0, 1), unused when greedy).
// Up to torch's thread count - 1 helpers on torch's inter-op pool take rows beside the calling thread. The caller
// never waits for a helper (at::parallel_for's join does: on a busy machine that costs a scheduler tick or more).
torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& inv_temp, const torch::Tensor& top_k,
                          const torch::Tensor& top_p, const torch::Tensor& min_p, const torch::Tensor& uniform) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == torch::kFloat &&
                  logits.is_contiguous(),
              "logits must be a contiguous CPU float32 tensor [B, V]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < std::numeric_limits<int32_t>::max(), "vocabulary size out of range");
  check_row_param(inv_temp, rows, torch::kFloat, "inv_temp");
  check_row_param(top_k, rows, torch::kLong, "top_k");
  check_row_param(top_p, rows, torch::kDouble, "top_p");
  check_row_param(min_p, rows, torch::kDouble, "min_p");
  check_row_param(uniform, rows, torch::kDouble, "uniform");
  auto batch = std::make_shared<RowBatch>();
  batch->logits = logits;
  batch->inv_temp = inv_temp;
  batch->top_k = top_k;
  batch->top_p = top_p;
  batch->min_p = min_p;
  batch->uniform = uniform;
  batch->rows = rows;
  batch->vocab = vocab;
  batch->tokens.reset(new std::atomic<int64_t>[rows]);
  for (int64_t r = 0; r < rows; ++r) batch->tokens[r].store(RowBatch::kPending, std::memory_order_relaxed);
  const int64_t helpers = std::min<int64_t>(at::get_num_threads() - 1, rows / kRowsPerHelper);
  for (int64_t i = 0; i < helpers; ++i) at::launch([batch] { drain(*batch); });
  drain(*batch);
  auto tokens = torch::empty({rows}, torch::kLong);
  int64_t* const out = tokens.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = batch->tokens[r].load(std::memory_order_acquire);
    out[r] = token != RowBatch::kPending ? token : batch->sample(r, thread_scratch());  // a helper still has it
  }
  return tokens;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_rows", &sample_rows, "one token per row: greedy, or temperature/min_p/top_k/top_p and a draw",
        py::call_guard<py::gil_scoped_release>());
}
