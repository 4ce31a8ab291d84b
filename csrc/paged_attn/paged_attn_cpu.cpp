// CPU attention over a paged (or contiguous) KV cache: FlashAttention's flash_attn_with_kvcache, and the
// cache writers reshape_and_cache / copy_blocks (vLLM's contracts).
//
// One task per (sequence, kv-heads, tile of up to kRows query rows, split of the keys). A query row is a
// (query position, query head of a kv-head's GQA group) pair, so the heads of a group share every K and
// V row the task reads: one memory read serves `group` dot products. Decoding tasks take several kv-heads
// so that they stream whole cache rows (Kernel below). A task walks its keys in spans of
// kSpan, looking each key up through the block table:
//   1. scores s[r][j] = alpha q_r . k_j for every row (at::vec dot products, q pre-scaled by alpha);
//   2. per row: softcap, ALiBi, the row's visible keys (causal / window), the running max, p = exp(s - max),
//      the running sum, and a rescale of the row's output accumulator when the max grew (online softmax);
//   3. o_r += p_rj v_j for every row (at::vec multiply-adds), V read once for the whole group.
// Decoding batches rarely have enough (sequence, kv-head) pairs for every thread, so long contexts are cut
// into splits (flash-decoding, Dao et al. 2023): each split keeps its own (max, sum, unnormalised output),
// and a reduction pass combines them, lse = M + log sum_s l_s exp(m_s - M). The same loop serves prefill
// (seqlen_q > 1): each row carries its own causal / window range, and rows skip keys they do not see.
//
// Storage may be fp32, fp64, bf16 or fp16; bf16/fp16 rows are converted to fp32 as they are read, and all
// math (scores, softmax, accumulators) is fp32 (fp64 for fp64 storage).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "paged_attn/paged_attn_ops.h"

namespace fastdl::paged_attn {
namespace {

using cpu::ceil_div;
using cpu::Vec;
using cpu::vexp_u20;
using cpu::vload;
using cpu::vstore;

// 16 rows: a whole GQA group of up to 16 heads in one task (Llama-3 70B has 8, MQA models 16-32 split
// into tiles), and 16 x 256 scores (16 KB in fp32) plus 16 output rows stay in L1/L2.
constexpr int64_t kRows = 16;
// Keys scored per softmax update: the rescale of the output accumulators is amortised over 256 keys.
constexpr int64_t kSpan = 256;
// A split shorter than this costs more in its partial output and the reduction than its parallelism gains.
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kMaxSplits = 64;
// Tasks per thread before splitting stops: enough for the dynamic schedule to balance uneven lengths.
constexpr int64_t kTasksPerThread = 4;
// K/V rows of one head are nheads_k * headdim elements apart (2 KB for 8 heads of 64 floats) and blocks
// are scattered, which hardware prefetchers do not follow: fetch this many rows ahead.
constexpr int64_t kPrefetchRows = 8;
// Keys per step of the inner loops: one load of a q row serves 4 dot products, whose horizontal sums are
// done together (sum4), and one load/store of an output row serves 4 multiply-adds.
constexpr int64_t kRun = 4;

// Keys of sequence b: seqlen_k, and query i's visible range [lo(i), hi(i)).
struct Seq {
  int64_t sq = 0, sk = 0, wl = -1, wr = -1;
  int64_t lo(int64_t i) const { return wl < 0 ? 0 : std::clamp<int64_t>(i + sk - sq - wl, 0, sk); }
  int64_t hi(int64_t i) const { return wr < 0 ? sk : std::clamp<int64_t>(i + sk - sq + wr + 1, 0, sk); }
};

inline Seq get_seq(const Params& p, int64_t b) {
  return Seq{p.seqlen_q, int64_t(p.cache_seqlens[b]) + p.seqlen_new, p.window_left, p.window_right};
}

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < d * int64_t(sizeof(T)); byte += 64) __builtin_prefetch(c + byte);
}

// Calls fn(j - j0, row, count) for the rows of tokens j0 .. j1 - 1 of kv-heads hk .. hk + nh - 1 of sequence b,
// in order, kRun rows (or fewer at a block's end) at a time: row points at head hk of the first token, the
// other heads are head_stride apart and the other tokens row_stride. One block-table lookup (and one
// division) per block, not per row. Blocks are scattered, which hardware prefetchers do not follow across:
// rows kPrefetchRows ahead are prefetched, into the next block too.
template <typename T, typename F>
inline void for_each_run(const T* base, const Params& p, int64_t b, int64_t hk, int64_t nh, int64_t j0, int64_t j1,
                         int64_t block_stride, int64_t row_stride, int64_t head_stride, const F& fn) {
  auto prefetch = [&](const T* row) {
    for (int64_t h = 0; h < nh; ++h) prefetch_row(row + h * head_stride, p.headdim);
  };
  auto locate = [&](int64_t j, int64_t& len) {
    int64_t block = b, row = j;
    if (p.block_table) {
      block = p.block_table[b * p.block_table_batch_stride + j / p.block_size];
      row = j % p.block_size;
    }
    len = std::min(p.block_size - row, j1 - j);
    return base + block * block_stride + row * row_stride + hk * head_stride;
  };
  int64_t len;
  const T* ptr = locate(j0, len);
  for (int64_t j = j0; j < j1;) {
    int64_t next_len = 0;
    const T* next = j + len < j1 ? locate(j + len, next_len) : nullptr;
    for (int64_t t = 0; t < len; t += kRun) {
      const int64_t count = std::min(kRun, len - t);
      for (int64_t ahead = t + kPrefetchRows; ahead < t + kPrefetchRows + count; ++ahead) {
        if (ahead < len) {
          prefetch(ptr + ahead * row_stride);
        } else if (next && ahead - len < next_len) {
          prefetch(next + (ahead - len) * row_stride);
        }
      }
      fn(j + t - j0, ptr + t * row_stride, count);
    }
    j += len;
    ptr = next;
    len = next_len;
  }
}

// A [d] row in the math type: the storage itself, or converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_math(const scalar_t* src, int64_t d, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    cpu::convert_n(src, buf, d);
    return buf;
  }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V acc0(T(0)), acc1(T(0));
  int64_t c = 0;
  for (; c + 2 * W <= d; c += 2 * W) {  // two chains: a multiply-add's latency is 4 cycles
    acc0 = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc0);
    acc1 = at::vec::fmadd(V::loadu(a + c + W), V::loadu(b + c + W), acc1);
  }
  for (; c < d; c += W) {
    const int64_t n = std::min(W, d - c);
    acc0 = at::vec::fmadd(vload(a + c, n), vload(b + c, n), acc0);
  }
  return at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, acc0 + acc1);
}

// o[0, d) += w * x[0, d)
template <typename T>
inline void axpy(T w, const T* x, T* o, int64_t d) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vw(w);
  for (int64_t c = 0; c < d; c += W) {
    const int64_t n = std::min(W, d - c);
    vstore(at::vec::fmadd(vw, vload(x + c, n), vload(o + c, n)), o + c, n);
  }
}

// out[u] = a . b[u] for u < 4.
template <typename T>
inline void dot4(const T* a, const T* const* b, int64_t d, T* out) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V acc[4] = {V(T(0)), V(T(0)), V(T(0)), V(T(0))};
  for (int64_t c = 0; c < d; c += W) {
    const int64_t n = std::min(W, d - c);
    const V x = vload(a + c, n);
    for (int u = 0; u < 4; ++u) acc[u] = at::vec::fmadd(x, vload(b[u] + c, n), acc[u]);
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // Horizontal sums of 4 vectors at once: fold 512 -> 256 bits pairwise, then 256 -> 128 so that 128-bit
    // lane u holds acc[u]'s partial sums, then within lanes; 8 shuffles and 4 adds instead of 4 x 8.
    const __m512 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
    y = _mm512_add_ps(y, _mm512_permute_ps(y, 0x4E));
    y = _mm512_add_ps(y, _mm512_permute_ps(y, 0xB1));
    const __m512 lanes = _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), y);
    _mm_storeu_ps(out, _mm512_castps512_ps128(lanes));
    return;
  }
#endif
  for (int u = 0; u < 4; ++u) out[u] = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, acc[u]);
}

// o[0, d) += sum_u w[u] * x[u][0, d) for u < 4.
template <typename T>
inline void axpy4(const T* w, const T* const* x, T* o, int64_t d) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V w0(w[0]), w1(w[1]), w2(w[2]), w3(w[3]);
  for (int64_t c = 0; c < d; c += W) {
    const int64_t n = std::min(W, d - c);
    V acc = at::vec::fmadd(w0, vload(x[0] + c, n), vload(o + c, n));
    acc = at::vec::fmadd(w1, vload(x[1] + c, n), acc);
    acc = at::vec::fmadd(w2, vload(x[2] + c, n), acc);
    vstore(at::vec::fmadd(w3, vload(x[3] + c, n), acc), o + c, n);
  }
}

template <typename T>
inline void scale_row(T* o, T f, int64_t d) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  for (int64_t c = 0; c < d; c += W) {
    const int64_t n = std::min(W, d - c);
    vstore(vload(o + c, n) * V(f), o + c, n);
  }
}

// One task's rows: kv-heads hk0 .. hk0 + nh - 1, each with rows [head_rows * hl, head_rows * (hl + 1)); per
// row its query position i, query head h, visible keys [lo, hi) and ALiBi slope.
template <typename acc_t>
struct Rows {
  int64_t n = 0, hk0 = 0, nh = 1, head_rows = 0;
  int64_t i[kRows], h[kRows], lo[kRows], hi[kRows];
  acc_t neg_slope[kRows];
};

// Per-worker scratch: q rows (pre-scaled), output accumulators, running max / sum, a span of scores, and
// kRun K / V rows converted to the math type.
template <typename acc_t>
struct Work {
  std::vector<acc_t> mem;
  acc_t *q, *o, *m, *l, *s, *row;
  explicit Work(int64_t d) : mem(2 * kRows * d + 2 * kRows + kRows * kSpan + kRun * d) {
    q = mem.data();
    o = q + kRows * d;
    m = o + kRows * d;
    l = m + kRows;
    s = l + kRows;
    row = s + kRows * kSpan;
  }
};

// Step 2 for one row over the span's columns [c0, c1): scores -> probabilities, online-softmax update.
template <typename acc_t, bool kSoftcap, bool kAlibi>
inline void softmax_update(acc_t* s, int64_t n, int64_t c0, int64_t c1, acc_t softcap, acc_t neg_slope, acc_t dist0,
                           acc_t& m, acc_t& l, acc_t* o, int64_t d) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const V neg_inf(-std::numeric_limits<acc_t>::infinity());
  V vmax = neg_inf;
  for (int64_t j = c0; j < c1; j += W) {
    const int64_t k = std::min(W, c1 - j);
    V x = vload(s + j, k);
    if constexpr (kSoftcap) x = V(softcap) * x.tanh();
    if constexpr (kAlibi) x = x + V(neg_slope) * (V(dist0) - V::arange(acc_t(j), acc_t(1))).abs();
    if constexpr (kSoftcap || kAlibi) vstore(x, s + j, k);
    vmax = at::vec::clamp_min(vmax, k == W ? x : V::set(neg_inf, x, k));  // clamp_min: a bare vmaxps
  }
  const acc_t m_new = std::max(m, at::vec::vec_reduce_all<acc_t>([](V a, V b) { return at::vec::clamp_min(a, b); },
                                                                  vmax));
  V vsum(acc_t(0));
  for (int64_t j = c0; j < c1; j += W) {
    const int64_t k = std::min(W, c1 - j);
    const V e = vexp_u20(vload(s + j, k) - V(m_new));
    vstore(e, s + j, k);
    vsum += k == W ? e : V::set(V(acc_t(0)), e, k);
  }
  std::fill(s, s + c0, acc_t(0));
  std::fill(s + c1, s + n, acc_t(0));
  const acc_t rescale = std::exp(m - m_new);  // 0 on the row's first keys (m was -inf)
  l = l * rescale + at::vec::vec_reduce_all<acc_t>([](V a, V b) { return a + b; }, vsum);
  m = m_new;
  if (rescale != acc_t(1)) scale_row(o, rescale, d);
}

// Work decomposition. Rows of one kv-head are (query position, head of its group) pairs, seqlen_q * group of
// them. When they are fewer than kRows (decoding), a task takes several kv-heads: a cache row holds every
// kv-head of a token side by side (nheads_k * headdim elements), so reading all of them streams whole
// rows, where one head's slice (256 bytes of a 2 KB row at 8 heads of 64 floats) leaves most of each
// DRAM page unread until another task comes by. When they are more, a kv-head's rows are cut into tiles.
template <typename scalar_t>
struct Kernel {
  using acc_t = cpu::opmath_t<scalar_t>;
  const Params& p;
  int64_t group, d, head_rows, heads_per_task, nchunks, ntiles, nsplit;

  explicit Kernel(const Params& params) : p(params) {
    group = p.nheads / p.nheads_k;
    d = p.headdim;
    head_rows = p.seqlen_q * group;
    heads_per_task = std::clamp<int64_t>(kRows / std::max<int64_t>(head_rows, 1), 1, p.nheads_k);
    nchunks = ceil_div(p.nheads_k, heads_per_task);
    ntiles = heads_per_task > 1 ? 1 : ceil_div(head_rows, kRows);
    nsplit = choose_splits();
  }

  // Splits per (sequence, head chunk, tile): enough tasks for every thread, each split at least
  // kMinSplitKeys keys.
  int64_t choose_splits() const {
    if (p.num_splits > 0) return std::min<int64_t>(p.num_splits, kMaxSplits);
    int64_t max_sk = 0;
    for (int64_t b = 0; b < p.batch; ++b) max_sk = std::max(max_sk, get_seq(p, b).sk);
    const int64_t base = std::max<int64_t>(1, p.batch * nchunks * ntiles);
    const int64_t want = ceil_div(kTasksPerThread * at::get_num_threads(), base);
    return std::clamp<int64_t>(std::min(want, max_sk / kMinSplitKeys), 1, kMaxSplits);
  }

  // The rows of (b, head chunk c, tile t); returns the keys any of them sees, [klo, khi) (empty when none).
  void rows_of(int64_t b, int64_t c, int64_t t, const Seq& seq, Rows<acc_t>& rows, int64_t& klo,
               int64_t& khi) const {
    rows.hk0 = c * heads_per_task;
    rows.nh = std::min(heads_per_task, p.nheads_k - rows.hk0);
    rows.n = heads_per_task > 1 ? rows.nh * head_rows : std::min(kRows, head_rows - t * kRows);
    rows.head_rows = heads_per_task > 1 ? head_rows : rows.n;
    klo = seq.sk;
    khi = 0;
    for (int64_t r = 0; r < rows.n; ++r) {
      const int64_t hl = r / rows.head_rows, row = t * kRows + r % rows.head_rows;
      rows.i[r] = row / group;
      rows.h[r] = (rows.hk0 + hl) * group + row % group;
      rows.lo[r] = seq.lo(rows.i[r]);
      rows.hi[r] = seq.hi(rows.i[r]);
      rows.neg_slope[r] = p.alibi_slopes ? -acc_t(p.alibi_slopes[b * p.alibi_batch_stride + rows.h[r]]) : acc_t(0);
      if (rows.lo[r] < rows.hi[r]) {
        klo = std::min(klo, rows.lo[r]);
        khi = std::max(khi, rows.hi[r]);
      }
    }
  }

  // Split sp's share of [klo, khi): whole 16-key pieces, so that spans start on aligned scores.
  void split_range(int64_t klo, int64_t khi, int64_t sp, int64_t& a, int64_t& e) const {
    const int64_t per = ceil_div(ceil_div(std::max<int64_t>(khi - klo, 0), nsplit), 16) * 16;
    a = std::min(khi, klo + sp * per);
    e = std::min(khi, a + per);
  }

  template <bool kSoftcap, bool kAlibi>
  void run_task(int64_t b, int64_t c, int64_t t, int64_t sp, Work<acc_t>& w, acc_t* partial) const {
    const Seq seq = get_seq(p, b);
    Rows<acc_t> rows;
    int64_t klo, khi, a, e;
    rows_of(b, c, t, seq, rows, klo, khi);
    split_range(klo, khi, sp, a, e);
    const int64_t n = rows.n;
    const acc_t alpha = acc_t(kSoftcap ? p.softmax_scale / p.softcap : p.softmax_scale);
    const acc_t softcap = acc_t(p.softcap);
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < n; ++r) {
      const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + rows.i[r] * p.q_row_stride +
                      rows.h[r] * p.q_head_stride;
      acc_t* qr = w.q + r * d;
      const acc_t* qm = as_math(q, d, qr);
      for (int64_t c = 0; c < d; ++c) qr[c] = qm[c] * alpha;
      w.m[r] = -inf;
      w.l[r] = acc_t(0);
      std::fill(w.o + r * d, w.o + (r + 1) * d, acc_t(0));
    }
    const auto* kbase = static_cast<const scalar_t*>(p.k_cache);
    const auto* vbase = static_cast<const scalar_t*>(p.v_cache);
    int64_t c0[kRows], c1[kRows];

    for (int64_t s0 = a; s0 < e; s0 += kSpan) {
      const int64_t ns = std::min(kSpan, e - s0);
      for (int64_t r = 0; r < n; ++r) {
        c0[r] = std::clamp<int64_t>(rows.lo[r] - s0, 0, ns);
        c1[r] = std::clamp<int64_t>(rows.hi[r] - s0, 0, ns);
      }
      // 1. scores: each K row is read once for all the rows of its kv-head.
      for_each_run(kbase, p, b, rows.hk0, rows.nh, s0, s0 + ns, p.k_block_stride, p.k_row_stride, p.k_head_stride,
                   [&](int64_t j, const scalar_t* run, int64_t count) {
                     const acc_t* k[kRun];
                     for (int64_t hl = 0, r = 0; hl < rows.nh; ++hl) {
                       for (int64_t u = 0; u < count; ++u) {
                         k[u] = as_math(run + u * p.k_row_stride + hl * p.k_head_stride, d, w.row + u * d);
                       }
                       for (const int64_t r1 = r + rows.head_rows; r < r1; ++r) {
                         acc_t* sr = w.s + r * kSpan + j;
                         if (count == kRun && j >= c0[r] && j + kRun <= c1[r]) {
                           dot4(w.q + r * d, k, d, sr);
                           continue;
                         }
                         for (int64_t u = 0; u < count; ++u) {
                           if (j + u >= c0[r] && j + u < c1[r]) sr[u] = dot(w.q + r * d, k[u], d);
                         }
                       }
                     }
                   });
      // 2. online softmax, row by row.
      for (int64_t r = 0; r < n; ++r) {
        acc_t* s = w.s + r * kSpan;
        if (c0[r] >= c1[r]) {
          std::fill(s, s + ns, acc_t(0));
          continue;
        }
        const acc_t dist0 = acc_t(rows.i[r] + seq.sk - seq.sq - s0);
        softmax_update<acc_t, kSoftcap, kAlibi>(s, ns, c0[r], c1[r], softcap, rows.neg_slope[r], dist0, w.m[r],
                                                w.l[r], w.o + r * d, d);
      }
      // 3. o += p v: each V row once for all the rows of its kv-head.
      for_each_run(vbase, p, b, rows.hk0, rows.nh, s0, s0 + ns, p.v_block_stride, p.v_row_stride, p.v_head_stride,
                   [&](int64_t j, const scalar_t* run, int64_t count) {
                     const acc_t* v[kRun];
                     for (int64_t hl = 0, r = 0; hl < rows.nh; ++hl) {
                       for (int64_t u = 0; u < count; ++u) {
                         v[u] = as_math(run + u * p.v_row_stride + hl * p.v_head_stride, d, w.row + u * d);
                       }
                       for (const int64_t r1 = r + rows.head_rows; r < r1; ++r) {
                         const acc_t* pr = w.s + r * kSpan + j;
                         if (count == kRun && j >= c0[r] && j + kRun <= c1[r]) {
                           axpy4(pr, v, w.o + r * d, d);
                           continue;
                         }
                         for (int64_t u = 0; u < count; ++u) {
                           if (j + u >= c0[r] && j + u < c1[r]) axpy(pr[u], v[u], w.o + r * d, d);
                         }
                       }
                     }
                   });
    }

    if (partial) {  // split-K: keep (m, l, unnormalised o) for the reduction
      for (int64_t r = 0; r < n; ++r) {
        acc_t* dst = partial + r * (d + 2);
        dst[0] = w.m[r];
        dst[1] = w.l[r];
        std::copy(w.o + r * d, w.o + (r + 1) * d, dst + 2);
      }
      return;
    }
    for (int64_t r = 0; r < n; ++r) finish_row(b, rows.i[r], rows.h[r], w.m[r], w.l[r], w.o + r * d);
  }

  // out = o / l and lse = m + log l; a row that saw no key (l == 0) gets 0 and +inf.
  void finish_row(int64_t b, int64_t i, int64_t h, acc_t m, acc_t l, acc_t* o) const {
    const bool empty = l == acc_t(0);
    auto* lse = static_cast<acc_t*>(p.softmax_lse);
    lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] =
        empty ? std::numeric_limits<acc_t>::infinity() : m + std::log(l);
    scale_row(o, empty ? acc_t(0) : acc_t(1) / l, d);
    auto* out = static_cast<scalar_t*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(o, o + d, out);
    } else {
      cpu::convert_n(o, out, d);
    }
  }

  // Combines the splits of (b, hk, t): M = max m_s, l = sum l_s e^(m_s - M), o = sum o_s e^(m_s - M).
  void reduce(int64_t b, int64_t c, int64_t t, const acc_t* partials, acc_t* o) const {
    const Seq seq = get_seq(p, b);
    Rows<acc_t> rows;
    int64_t klo, khi;
    rows_of(b, c, t, seq, rows, klo, khi);
    const int64_t stride = kRows * (d + 2);  // between splits
    for (int64_t r = 0; r < rows.n; ++r) {
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t sp = 0; sp < nsplit; ++sp) mx = std::max(mx, partials[sp * stride + r * (d + 2)]);
      acc_t l = 0;
      std::fill(o, o + d, acc_t(0));
      if (mx != -std::numeric_limits<acc_t>::infinity()) {
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const acc_t* part = partials + sp * stride + r * (d + 2);
          if (part[1] == acc_t(0)) continue;
          const acc_t f = std::exp(part[0] - mx);
          l += part[1] * f;
          axpy(f, part + 2, o, d);
        }
      }
      finish_row(b, rows.i[r], rows.h[r], mx, l, o);
    }
  }

  void run() const {
    const int64_t workers = at::get_num_threads();
    const int64_t base = p.batch * nchunks * ntiles;
    const int64_t items = base * nsplit;
    std::vector<acc_t> partials(nsplit > 1 ? items * kRows * (d + 2) : 0);
    FASTDL_BOOL_SWITCH(p.softcap > 0, kSoftcap, [&] {
      FASTDL_BOOL_SWITCH(p.alibi_slopes != nullptr, kAlibi, [&] {
        // Items handed out from a counter: sequences of different lengths balance across threads.
        std::atomic<int64_t> next{0};
        at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
          Work<acc_t> w(d);
          for (int64_t worker = w0; worker < w1; ++worker) {
            for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
              // Splits innermost: the splits of one sequence run side by side, sharing its block table row.
              const int64_t sp = item % nsplit, rest = item / nsplit;
              const int64_t t = rest % ntiles, c = rest / ntiles % nchunks, b = rest / ntiles / nchunks;
              acc_t* partial = nsplit > 1 ? partials.data() + item * kRows * (d + 2) : nullptr;
              run_task<kSoftcap, kAlibi>(b, c, t, sp, w, partial);
            }
          }
        });
      });
    });
    if (nsplit == 1) return;
    at::parallel_for(0, base, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> o(d);
      for (int64_t rest = begin; rest < end; ++rest) {
        const int64_t t = rest % ntiles, c = rest / ntiles % nchunks, b = rest / ntiles / nchunks;
        reduce(b, c, t, partials.data() + rest * nsplit * kRows * (d + 2), o.data());
      }
    });
  }
};

template <typename scalar_t>
void attn_cpu(const Params& p) {
  Kernel<scalar_t>(p).run();
}

void launch_attn_cpu(const Params& p) {
  switch (p.dtype) {
    case DType::kFloat32: return attn_cpu<float>(p);
    case DType::kFloat64: return attn_cpu<double>(p);
    case DType::kBFloat16: return attn_cpu<c10::BFloat16>(p);
    case DType::kFloat16: return attn_cpu<c10::Half>(p);
  }
}

// ---- cache writers: byte copies of headdim-long rows --------------------------------------------------

void launch_write_cpu(const CacheWriteParams& w) {
  const int64_t row_bytes = w.headdim * w.element_size, es = w.element_size;
  at::parallel_for(0, w.num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t slot = w.slot_mapping[n];
      if (slot < 0) continue;  // padding token
      const int64_t block = slot / w.block_size, row = slot % w.block_size;
      for (int64_t h = 0; h < w.nheads_k; ++h) {
        std::memcpy(static_cast<char*>(w.k_cache) + (block * w.k_block_stride + row * w.k_row_stride + h * w.k_head_stride) * es,
                    static_cast<const char*>(w.key) + (n * w.key_token_stride + h * w.key_head_stride) * es, row_bytes);
        std::memcpy(static_cast<char*>(w.v_cache) + (block * w.v_block_stride + row * w.v_row_stride + h * w.v_head_stride) * es,
                    static_cast<const char*>(w.value) + (n * w.value_token_stride + h * w.value_head_stride) * es,
                    row_bytes);
      }
    }
  });
}

void copy_block(char* base, int64_t src, int64_t dst, int64_t block_stride, int64_t row_stride, int64_t head_stride,
                const CopyBlocksParams& c) {
  const int64_t es = c.element_size;
  if (row_stride == c.nheads_k * c.headdim && head_stride == c.headdim) {  // one dense block
    std::memcpy(base + dst * block_stride * es, base + src * block_stride * es, c.block_size * row_stride * es);
    return;
  }
  for (int64_t r = 0; r < c.block_size; ++r) {
    for (int64_t h = 0; h < c.nheads_k; ++h) {
      const int64_t off = r * row_stride + h * head_stride;
      std::memcpy(base + (dst * block_stride + off) * es, base + (src * block_stride + off) * es, c.headdim * es);
    }
  }
}

void launch_copy_cpu(const CopyBlocksParams& c) {
  at::parallel_for(0, c.num_pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t src = c.block_mapping[2 * i], dst = c.block_mapping[2 * i + 1];
      if (src == dst) continue;
      copy_block(static_cast<char*>(c.k_cache), src, dst, c.k_block_stride, c.k_row_stride, c.k_head_stride, c);
      copy_block(static_cast<char*>(c.v_cache), src, dst, c.v_block_stride, c.v_row_stride, c.v_head_stride, c);
    }
  });
}

}  // namespace
}  // namespace fastdl::paged_attn

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  FASTDL_REGISTER_PAGED_ATTN_IMPLS(m, fastdl::paged_attn::launch_attn_cpu, fastdl::paged_attn::launch_write_cpu,
                                   fastdl::paged_attn::launch_copy_cpu);
}
