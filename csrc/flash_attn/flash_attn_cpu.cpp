// CPU flash attention (FlashAttention-2's algorithm, Dao 2023), forward and backward.
//
// Forward: for each (sequence, head, block of kFwdBlockM queries), walk the keys in blocks of kFwdBlockN:
// S = Q K^T, then, per row and in SIMD registers, softcap / ALiBi / window mask, the running max,
// P = exp(S - max) with its row sum, and a rescale of the output accumulator when the max grows;
// O += P V. Only the keys a block of queries can see are visited (causal attention does half the work).
// K^T and V are packed once per call as GEMM operands (flash_attn_cpu_gemm.h), in the math type.
//
// Backward: one task per (sequence, kv-head, split of the key blocks). For each key block it recomputes
// P = exp(S - lse) tile by tile from the saved logsumexp, never storing a seqlen_q x seqlen_k matrix:
// dV += P^T dO, dP = dO V^T, dS = P * (dP - D) with D = rowsum(dO * O), dK += dS^T Q, dQ += dS K.
// dK and dV of a key block belong to one task (it loops over the query heads of its kv-head for
// GQA/MQA). dQ gathers over key blocks: each split accumulates into its own buffer (dq itself when
// there is one split and dq is in the math type), summed in split order at the end. So the result does
// not depend on scheduling: it is bitwise reproducible for a given thread count.
//
// Memory beyond inputs and outputs is O(seqlen): packed copies of K, V (forward) and Q, dO (backward),
// softmax_lse, per-thread tiles, and the dQ split buffers.
//
// Work is handed out from an atomic counter, heaviest first (causal query blocks near the end see the
// most keys), so that uneven blocks balance across threads.
//
// bf16/fp16 are converted to fp32 as they are packed or loaded and all math is fp32; fp64 runs in fp64
// (for gradcheck). Everything, GEMMs included, is written here with at::vec.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common/cpu_utils.h"
#include "common/dispatch.h"
#include "flash_attn/flash_attn_cpu_gemm.h"
#include "flash_attn/flash_attn_ops.h"

namespace fastdl::flash_attn {
namespace {

using cpu::ceil_div;
using cpu::Vec;
using cpu::vexp_u20;
using cpu::vload;
using cpu::vstore;
using cpu_gemm::kPanel;
using cpu_gemm::PackedB;

// Tile sizes, from a sweep on one core (benchmarks/RESULTS.md; differences of <= 6%, near the noise).
// Forward: 24 query rows (4 strips of the GEMM micro-kernel) x 512 keys; the 48 KB score tile is about
// an L1d, the output rescale is amortised over 512 keys, and the causal diagonal wastes little.
constexpr int64_t kFwdBlockM = 24;
constexpr int64_t kFwdBlockN = 512;
// Backward: 128 query rows x 64 keys (one panel): P, dS and 1 - tanh^2 tiles of 32 KB each, and a
// causal diagonal of 64 keys.
constexpr int64_t kBwdBlockM = 128;
constexpr int64_t kBwdBlockN = 64;
// Decoding (few query rows per key): packing K and V would cost more than the attention, which reads
// each key once per query row anyway. Below this many query rows per kv-head, the forward works row by
// row on K and V as stored (fwd_row).
constexpr int64_t kMaxRowsForRowPath = 8;
constexpr int64_t kPrefetchRows = 8;
// Enough tasks per thread that the dynamic schedule balances; more splits cost one dQ buffer each.
constexpr int64_t kTasksPerThread = 2;
constexpr int64_t kMaxSplits = 8;

// Scratch memory for one call, from a cache per calling thread that only grows: writing 16 MB of fresh
// pages (what a 4 x 1024 x 8 x 64 forward packs) costs 6.7 ms on the benchmark machine against 0.5 ms
// for pages already mapped. Buffers above kMaxCachedBytes are freed after the call instead. One slot
// per concurrent use within a call.
enum Slot { kSlotPackA, kSlotPackB, kSlotRows, kSlotTiles, kSlotDq, kNumSlots };
constexpr size_t kMaxCachedBytes = size_t(256) << 20;

template <typename T>
class Scratch {
 public:
  Scratch(Slot slot, int64_t n) {
    const size_t bytes = size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 64;
    thread_local std::unique_ptr<char[]> cache[kNumSlots];
    thread_local size_t cached[kNumSlots] = {};
    char* raw;
    if (bytes > kMaxCachedBytes) {
      owned_.reset(new char[bytes]);
      raw = owned_.get();
    } else {
      if (cached[slot] < bytes) {
        cache[slot].reset(new char[bytes]);
        cached[slot] = bytes;
      }
      raw = cache[slot].get();
    }
    ptr_ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t(63));  // 64-byte lines
  }
  T* get() const { return ptr_; }

 private:
  std::unique_ptr<char[]> owned_;
  T* ptr_;
};

// ---- small helpers ------------------------------------------------------------------------------

// A [rows x d] tile in the math type: the storage itself when it already is the math type (leading
// dimension ld), else a converted copy in buf (leading dimension d).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_tile(const scalar_t* src, int64_t ld, int64_t rows, int64_t d, acc_t* buf, int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) cpu::convert_n(src + r * ld, buf + r * d, d);
    ld_out = d;
    return buf;
  }
}

// dst[r] = src[r] * scale[r] in the storage type; scale nullptr means 1.
template <typename acc_t, typename scalar_t>
inline void store_rows(const acc_t* src, int64_t ld_src, int64_t rows, int64_t d, const acc_t* scale, scalar_t* dst,
                       int64_t ld_dst, acc_t* row_buf) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = src + r * ld_src;
    acc_t* t = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dst + r * ld_dst) : row_buf;
    const V f(scale ? scale[r] : acc_t(1));
    for (int64_t j = 0; j < d; j += W) {
      const int64_t n = std::min(W, d - j);
      vstore(vload(s + j, n) * f, t + j, n);
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) cpu::convert_n(row_buf, dst + r * ld_dst, d);
  }
}

// One sequence of the batch: where its rows start, its lengths, and the keys each query row sees.
struct Seq {
  int64_t q_row0 = 0, k_row0 = 0;  // first row in q / k (varlen), else 0
  int64_t sq = 0, sk = 0;
  int64_t wl = -1, wr = -1;

  // Query i sees keys [lo(i), hi(i)); both ends are non-decreasing in i.
  int64_t lo(int64_t i) const { return wl < 0 ? 0 : std::clamp<int64_t>(i + sk - sq - wl, 0, sk); }
  int64_t hi(int64_t i) const { return wr < 0 ? sk : std::clamp<int64_t>(i + sk - sq + wr + 1, 0, sk); }
  // Queries that see at least one key of [n0, n1).
  int64_t first_query(int64_t n0) const { return wr < 0 ? 0 : std::clamp<int64_t>(n0 - (sk - sq) - wr, 0, sq); }
  int64_t end_query(int64_t n1) const { return wl < 0 ? sq : std::clamp<int64_t>(n1 - (sk - sq) + wl, 0, sq); }
};

inline Seq get_seq(const FwdParams& p, int64_t b) {
  Seq s;
  if (p.cu_seqlens_q) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - s.q_row0;
    s.sk = p.cu_seqlens_k[b + 1] - s.k_row0;
  } else {
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
  }
  s.wl = p.window_left;
  s.wr = p.window_right;
  return s;
}

// Pointer to row `row` of sequence b, head h, of a [batch, seqlen, heads, d] or [total, heads, d] tensor.
template <typename T>
inline T* row_ptr(T* base, const FwdParams& p, int64_t b, const Seq& s, bool is_q, int64_t row, int64_t h,
                  int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  const int64_t row0 = p.cu_seqlens_q ? (is_q ? s.q_row0 : s.k_row0) : 0;
  return base + (p.cu_seqlens_q ? 0 : b * batch_stride) + (row0 + row) * row_stride + h * head_stride;
}

// softmax_lse element (b, h, i): [batch, heads, seqlen_q] or [heads, total_q].
inline int64_t lse_index(const FwdParams& p, int64_t b, const Seq& s, int64_t h, int64_t i) {
  return (p.cu_seqlens_q ? s.q_row0 : b * p.lse_batch_stride) + h * p.lse_head_stride + i;
}

inline double alibi_slope(const FwdParams& p, int64_t b, int64_t h) {
  return p.alibi_slopes ? double(p.alibi_slopes[b * p.alibi_batch_stride + h]) : 0.0;
}

// Runs fn(item, worker) for item in [0, n) on all threads, handing items out from an atomic counter.
// worker in [0, num_workers) indexes per-thread scratch.
template <typename F>
void parallel_items(int64_t n, int64_t num_workers, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, num_workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t item = next.fetch_add(1); item < n; item = next.fetch_add(1)) fn(item, w);
  });
}

// ---- per-row score processing -------------------------------------------------------------------
//
// s holds alpha * q.k for one query row, alpha = softmax_scale (or softmax_scale / softcap, so that
// softcap * tanh(s) is the capped score). Columns [c0, c1) are the keys the row sees. dist0 is the
// ALiBi distance of column 0: |i + sk - sq - (n0 + j)| = |dist0 - j|.

template <typename T, bool kSoftcap, bool kAlibi>
inline Vec<T> score(Vec<T> x, T softcap, T neg_slope, T dist0, int64_t j) {
  using V = Vec<T>;
  if constexpr (kSoftcap) x = V(softcap) * x.tanh();
  if constexpr (kAlibi) x = x + V(neg_slope) * (V(dist0) - V::arange(T(j), T(1))).abs();
  return x;
}

// Forward: s[c0, c1) <- scores, returns their max.
template <typename T, bool kSoftcap, bool kAlibi>
inline T score_row_max(T* s, int64_t c0, int64_t c1, T softcap, T neg_slope, T dist0) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V neg_inf(-std::numeric_limits<T>::infinity());
  V vmax = neg_inf;
  for (int64_t j = c0; j < c1; j += W) {
    const int64_t n = std::min(W, c1 - j);
    V x = score<T, kSoftcap, kAlibi>(vload(s + j, n), softcap, neg_slope, dist0, j);
    if constexpr (kSoftcap || kAlibi) vstore(x, s + j, n);
    // clamp_min is a bare vmaxps; at::vec::maximum adds a NaN check that cost ~15% of this loop.
    vmax = at::vec::clamp_min(vmax, n == W ? x : V::set(neg_inf, x, n));
  }
  return at::vec::vec_reduce_all<T>([](V a, V b) { return at::vec::clamp_min(a, b); }, vmax);
}

// s[c0, c1) <- exp(s - sub); returns their sum.
template <typename T>
inline T exp_row_sum(T* s, int64_t c0, int64_t c1, T sub) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V vsum(T(0));
  for (int64_t j = c0; j < c1; j += W) {
    const int64_t n = std::min(W, c1 - j);
    V e = vexp_u20(vload(s + j, n) - V(sub));
    vstore(e, s + j, n);
    vsum += n == W ? e : V::set(V(T(0)), e, n);
  }
  return at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, vsum);
}

// Backward: s[c0, c1) <- P = exp(score - lse) and, with softcap, dtanh[c0, c1) <- 1 - tanh^2 (the
// derivative of the capped score by alpha * q.k, over softcap).
template <typename T, bool kSoftcap, bool kAlibi>
inline void prob_row(T* s, T* dtanh, int64_t c0, int64_t c1, T softcap, T neg_slope, T dist0, T lse) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  for (int64_t j = c0; j < c1; j += W) {
    const int64_t n = std::min(W, c1 - j);
    V x = vload(s + j, n);
    if constexpr (kSoftcap) {
      const V t = x.tanh();
      vstore(V(T(1)) - t * t, dtanh + j, n);
      x = V(softcap) * t;
    }
    if constexpr (kAlibi) x = x + V(neg_slope) * (V(dist0) - V::arange(T(j), T(1))).abs();
    vstore(vexp_u20(x - V(lse)), s + j, n);
  }
}

// ---- forward ------------------------------------------------------------------------------------

// K^T and V of every (sequence, kv-head), packed as the B operands of S = Q K^T and O += P V. Keys are
// padded per sequence to whole panels: sequence b's keys start at padded row kpad0[b].
//   kt [nheads_k][kpad / kPanel panels][headdim][kPanel]
//   vp [nheads_k][ceil(headdim / kPanel) panels][kpad][kPanel]
template <typename acc_t>
struct FwdPacks {
  const acc_t* kt;
  const acc_t* vp;
  const int64_t* kpad0;
  int64_t kpad, d_panels;
};

template <typename scalar_t, bool kSoftcap, bool kAlibi>
void fwd_block(const FwdParams& p, const FwdPacks<cpu::opmath_t<scalar_t>>& packs, int64_t b, int64_t h, int64_t m0,
               const Seq& seq, cpu::opmath_t<scalar_t>* buf) {
  using acc_t = cpu::opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t BM = kFwdBlockM, BN = kFwdBlockN, P = kPanel<acc_t>;
  const int64_t d = p.headdim, hk = h / (p.nheads / p.nheads_k);
  const int64_t mb = std::min(BM, seq.sq - m0);
  acc_t* s_tile = buf;                 // [BM, BN]
  acc_t* o_acc = s_tile + BM * BN;     // [BM, d]
  acc_t* row_max = o_acc + BM * d;     // [BM]
  acc_t* row_sum = row_max + BM;       // [BM]
  acc_t* q_buf = row_sum + BM;         // [BM, d]  converted Q (bf16 / fp16), then an output row

  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  std::fill(row_max, row_max + mb, -inf);
  std::fill(row_sum, row_sum + mb, acc_t(0));
  std::fill(o_acc, o_acc + mb * d, acc_t(0));

  const auto* q = row_ptr(static_cast<const scalar_t*>(p.q), p, b, seq, true, m0, h, p.q_batch_stride, p.q_row_stride,
                          p.q_head_stride);
  int64_t ldq;
  const acc_t* q_tile = load_tile(q, p.q_row_stride, mb, d, q_buf, ldq);

  const acc_t softcap = acc_t(p.softcap);
  const acc_t alpha = acc_t(kSoftcap ? p.softmax_scale / p.softcap : p.softmax_scale);
  const acc_t neg_slope = acc_t(-alibi_slope(p, b, h));
  // Key tiles start on panel boundaries (the packs' granularity); keys left of the window are masked.
  const int64_t n_begin = seq.lo(m0) / P * P, n_end = seq.hi(m0 + mb - 1);
  const int64_t krow0 = packs.kpad0[b];
  const PackedB<acc_t> v_packed{packs.vp + hk * packs.d_panels * packs.kpad * P, packs.kpad * P, krow0};

  for (int64_t n0 = n_begin; n0 < n_end; n0 += BN) {
    const int64_t nb = std::min(BN, n_end - n0);
    const PackedB<acc_t> kt{packs.kt + (hk * packs.kpad + krow0 + n0) * d, d * P};
    cpu_gemm::gemm<acc_t>(mb, nb, d, alpha, q_tile, ldq, 1, kt, false, s_tile, nb);  // S = Q K^T

    for (int64_t r = 0; r < mb; ++r) {
      const int64_t i = m0 + r;
      acc_t* s = s_tile + r * nb;
      const int64_t c0 = std::max<int64_t>(seq.lo(i) - n0, 0), c1 = std::min<int64_t>(seq.hi(i) - n0, nb);
      if (c0 >= c1) {
        std::fill(s, s + nb, acc_t(0));
        continue;
      }
      const acc_t dist0 = acc_t(i + seq.sk - seq.sq - n0);
      const acc_t m_new =
          std::max(row_max[r], score_row_max<acc_t, kSoftcap, kAlibi>(s, c0, c1, softcap, neg_slope, dist0));
      const acc_t l = exp_row_sum(s, c0, c1, m_new);
      std::fill(s, s + c0, acc_t(0));
      std::fill(s + c1, s + nb, acc_t(0));
      const acc_t rescale = std::exp(row_max[r] - m_new);  // 0 on the first visible tile (max was -inf)
      row_sum[r] = row_sum[r] * rescale + l;
      row_max[r] = m_new;
      if (rescale != acc_t(1)) {
        acc_t* o = o_acc + r * d;
        for (int64_t j = 0; j < d; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), d - j);
          vstore(vload(o + j, n) * V(rescale), o + j, n);
        }
      }
    }
    PackedB<acc_t> v_tile = v_packed;
    v_tile.row0 += n0;
    cpu_gemm::gemm<acc_t>(mb, d, nb, acc_t(1), s_tile, nb, 1, v_tile, true, o_acc, d);  // O += P V
  }

  // Epilogue: O / rowsum, and lse = max + log(rowsum). A row that saw no key has rowsum 0: its output
  // is 0 and its lse +inf (as FlashAttention-2), which makes the backward's exp(S - lse) exactly 0.
  acc_t* lse = static_cast<acc_t*>(p.softmax_lse);
  for (int64_t r = 0; r < mb; ++r) {
    const bool empty = row_sum[r] == acc_t(0);
    lse[lse_index(p, b, seq, h, m0 + r)] = empty ? inf : row_max[r] + std::log(row_sum[r]);
    row_sum[r] = empty ? acc_t(0) : acc_t(1) / row_sum[r];
  }
  auto* out = row_ptr(static_cast<scalar_t*>(p.out), p, b, seq, true, m0, h, p.o_batch_stride, p.o_row_stride,
                      p.o_head_stride);
  store_rows(o_acc, d, mb, d, row_sum, out, p.o_row_stride, q_buf);
}

// One query row against the keys it sees, without packing: scores by dot products with K's rows,
// then the row's softmax in one piece (max, exp and sum over all its keys), then O = sum_j p_j v_j.
// buf: [seqlen_k] scores, [d] q, [d] output, [d] converted K/V row.
template <typename scalar_t, bool kSoftcap, bool kAlibi>
void fwd_row(const FwdParams& p, int64_t b, int64_t h, int64_t i, const Seq& seq, cpu::opmath_t<scalar_t>* buf) {
  using acc_t = cpu::opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t d = p.headdim, hk = h / (p.nheads / p.nheads_k);
  acc_t* s = buf;
  acc_t* q_buf = s + std::max<int64_t>(p.seqlen_k, 1);
  acc_t* o = q_buf + d;
  acc_t* row_buf = o + d;
  acc_t* lse = static_cast<acc_t*>(p.softmax_lse);
  auto* out = row_ptr(static_cast<scalar_t*>(p.out), p, b, seq, true, i, h, p.o_batch_stride, p.o_row_stride,
                      p.o_head_stride);
  const int64_t lo = seq.lo(i), hi = seq.hi(i);
  if (lo >= hi) {  // sees no key: output 0, lse +inf (as the tiled path)
    std::fill(o, o + d, acc_t(0));
    store_rows(o, d, 1, d, static_cast<const acc_t*>(nullptr), out, d, row_buf);
    lse[lse_index(p, b, seq, h, i)] = std::numeric_limits<acc_t>::infinity();
    return;
  }
  int64_t unused;
  const auto* q = row_ptr(static_cast<const scalar_t*>(p.q), p, b, seq, true, i, h, p.q_batch_stride, p.q_row_stride,
                          p.q_head_stride);
  const acc_t* qv = load_tile(q, 0, 1, d, q_buf, unused);
  const acc_t alpha = acc_t(p.softcap > 0 ? p.softmax_scale / p.softcap : p.softmax_scale);
  const auto* k = row_ptr(static_cast<const scalar_t*>(p.k), p, b, seq, false, lo, hk, p.k_batch_stride,
                          p.k_row_stride, p.k_head_stride);
  // Rows of one head are a row stride apart (4 KB for 16 heads of 64 floats), which hardware prefetchers
  // do not follow across pages: fetch kPrefetchRows ahead.
  const int64_t row_bytes = d * int64_t(sizeof(scalar_t));
  auto prefetch = [&](const scalar_t* row) {
    for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
  };
  for (int64_t j = 0; j < hi - lo; ++j) {
    if (j + kPrefetchRows < hi - lo) prefetch(k + (j + kPrefetchRows) * p.k_row_stride);
    const acc_t* kv = load_tile(k + j * p.k_row_stride, 0, 1, d, row_buf, unused);
    V acc(acc_t(0));
    for (int64_t c = 0; c < d; c += W) {
      const int64_t n = std::min(W, d - c);
      acc = at::vec::fmadd(vload(qv + c, n), vload(kv + c, n), acc);
    }
    s[j] = alpha * at::vec::vec_reduce_all<acc_t>([](V x, V y) { return x + y; }, acc);
  }
  const acc_t m = score_row_max<acc_t, kSoftcap, kAlibi>(s, 0, hi - lo, acc_t(p.softcap),
                                                         acc_t(-alibi_slope(p, b, h)),
                                                         acc_t(i + seq.sk - seq.sq - lo));
  const acc_t l = exp_row_sum(s, 0, hi - lo, m);
  std::fill(o, o + d, acc_t(0));
  const auto* v = row_ptr(static_cast<const scalar_t*>(p.v), p, b, seq, false, lo, hk, p.v_batch_stride,
                          p.v_row_stride, p.v_head_stride);
  for (int64_t j = 0; j < hi - lo; ++j) {
    if (j + kPrefetchRows < hi - lo) prefetch(v + (j + kPrefetchRows) * p.v_row_stride);
    const acc_t* vv = load_tile(v + j * p.v_row_stride, 0, 1, d, row_buf, unused);
    const V pj(s[j]);
    for (int64_t c = 0; c < d; c += W) {
      const int64_t n = std::min(W, d - c);
      vstore(at::vec::fmadd(pj, vload(vv + c, n), vload(o + c, n)), o + c, n);
    }
  }
  const acc_t inv = acc_t(1) / l;
  store_rows(o, d, 1, d, &inv, out, d, row_buf);
  lse[lse_index(p, b, seq, h, i)] = m + std::log(l);
}

template <typename scalar_t>
void fwd_cpu(const FwdParams& p) {
  using acc_t = cpu::opmath_t<scalar_t>;
  constexpr int64_t BM = kFwdBlockM, BN = kFwdBlockN, P = kPanel<acc_t>;
  static_assert(BN % P == 0, "key tiles are whole panels");
  const int64_t d = p.headdim, bh = p.batch * p.nheads, nheads_k = p.nheads_k;
  const int64_t workers = at::get_num_threads();

  if (p.seqlen_q * (p.nheads / nheads_k) <= kMaxRowsForRowPath) {
    const int64_t per_worker = std::max<int64_t>(p.seqlen_k, 1) + 3 * d;
    Scratch<acc_t> rows(kSlotTiles, workers * per_worker);
    FASTDL_BOOL_SWITCH(p.softcap > 0, kSoftcap, [&] {
      FASTDL_BOOL_SWITCH(p.alibi_slopes != nullptr, kAlibi, [&] {
        parallel_items(bh * p.seqlen_q, workers, [&](int64_t item, int64_t w) {
          const int64_t i = item / bh, b = item % bh / p.nheads, h = item % p.nheads;
          const Seq s = get_seq(p, b);
          if (i < s.sq) fwd_row<scalar_t, kSoftcap, kAlibi>(p, b, h, i, s, rows.get() + w * per_worker);
        });
      });
    });
    return;
  }

  std::vector<int64_t> kpad0(p.batch + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b) kpad0[b + 1] = kpad0[b] + ceil_div(get_seq(p, b).sk, P) * P;
  FwdPacks<acc_t> packs{nullptr, nullptr, kpad0.data(), kpad0[p.batch], ceil_div(d, P)};
  Scratch<acc_t> kt(kSlotPackA, nheads_k * packs.kpad * d);
  Scratch<acc_t> vp(kSlotPackB, nheads_k * packs.d_panels * packs.kpad * P);
  packs.kt = kt.get();
  packs.vp = vp.get();
  // Pack in chunks of BN keys, so that few heads (MQA, batch 1) still spread over the threads.
  const int64_t chunks = ceil_div(p.seqlen_k, BN);
  at::parallel_for(0, p.batch * nheads_k * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (nheads_k * chunks), hk = item / chunks % nheads_k, n0 = item % chunks * BN;
      const Seq s = get_seq(p, b);
      if (n0 >= s.sk) continue;
      const int64_t nb = std::min(BN, s.sk - n0);
      const auto* k = row_ptr(static_cast<const scalar_t*>(p.k), p, b, s, false, n0, hk, p.k_batch_stride,
                              p.k_row_stride, p.k_head_stride);
      const auto* v = row_ptr(static_cast<const scalar_t*>(p.v), p, b, s, false, n0, hk, p.v_batch_stride,
                              p.v_row_stride, p.v_head_stride);
      cpu_gemm::pack_b(d, nb, k, 1, p.k_row_stride, kt.get() + (hk * packs.kpad + kpad0[b] + n0) * d, d * P);
      cpu_gemm::pack_b(nb, d, v, p.v_row_stride, 1, vp.get() + hk * packs.d_panels * packs.kpad * P,
                       packs.kpad * P, kpad0[b] + n0);
    }
  });

  const int64_t per_worker = BM * BN + 2 * BM * d + 2 * BM;
  Scratch<acc_t> tiles(kSlotTiles, workers * per_worker);
  const int64_t nqb = ceil_div(p.seqlen_q, BM);
  FASTDL_BOOL_SWITCH(p.softcap > 0, kSoftcap, [&] {
    FASTDL_BOOL_SWITCH(p.alibi_slopes != nullptr, kAlibi, [&] {
      // Items run heaviest first: the last query blocks see the most keys under a causal mask.
      parallel_items(bh * nqb, workers, [&](int64_t item, int64_t w) {
        const int64_t qb = nqb - 1 - item / bh, b = item % bh / p.nheads, h = item % p.nheads;
        const Seq s = get_seq(p, b);
        if (qb * BM < s.sq)
          fwd_block<scalar_t, kSoftcap, kAlibi>(p, packs, b, h, qb * BM, s, tiles.get() + w * per_worker);
      });
    });
  });
}

// ---- backward -----------------------------------------------------------------------------------

// Where one split accumulates dQ: dq itself, or a [total_q, heads, d] math-type buffer.
template <typename acc_t>
struct DqTarget {
  acc_t* base;
  int64_t batch_stride, row_stride, head_stride;
};

// Q and dO of every query row, packed as the B operands of dK += dS^T Q and dV += P^T dO, and
// D = rowsum(dO * O) - dlse. Rows are global query rows (b * seqlen_q + i, or the varlen row).
//   qp, dop [nheads][ceil(headdim / kPanel) panels][total_q][kPanel];  delta [nheads][total_q]
template <typename acc_t>
struct BwdPacks {
  const acc_t* qp;
  const acc_t* dop;
  const acc_t* delta;
  int64_t total_q, d_panels;
};

template <typename scalar_t, bool kSoftcap, bool kAlibi>
void bwd_key_block(const BwdParams& p, const BwdPacks<cpu::opmath_t<scalar_t>>& packs, int64_t b, int64_t hk,
                   int64_t n0, const Seq& seq, int64_t qrow0, const DqTarget<cpu::opmath_t<scalar_t>>& dqt,
                   cpu::opmath_t<scalar_t>* buf) {
  using acc_t = cpu::opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t BM = kBwdBlockM, BN = kBwdBlockN, P = kPanel<acc_t>;
  const int64_t d = p.headdim, group = p.nheads / p.nheads_k, d_panels = packs.d_panels;
  const int64_t nb = std::min(BN, seq.sk - n0);
  acc_t* p_tile = buf;                          // [BM, BN]  P
  acc_t* ds_tile = p_tile + BM * BN;            // [BM, BN]  dP, then dS
  acc_t* dt_tile = ds_tile + BM * BN;           // [BM, BN]  1 - tanh^2 (softcap)
  acc_t* dk_acc = dt_tile + BM * BN;            // [BN, d]
  acc_t* dv_acc = dk_acc + BN * d;              // [BN, d]
  acc_t* kt = dv_acc + BN * d;                  // K^T packed: [BN / P][d][P]
  acc_t* vt = kt + BN * d;                      // V^T packed: [BN / P][d][P]
  acc_t* kp = vt + BN * d;                      // K packed:   [d_panels][BN][P]
  acc_t* q_buf = kp + d_panels * BN * P;        // [BM, d]  converted Q / dO tiles (bf16 / fp16)
  acc_t* do_buf = q_buf + BM * d;               // [BM, d]

  const auto* k = row_ptr(static_cast<const scalar_t*>(p.k), p, b, seq, false, n0, hk, p.k_batch_stride, p.k_row_stride,
                          p.k_head_stride);
  const auto* v = row_ptr(static_cast<const scalar_t*>(p.v), p, b, seq, false, n0, hk, p.v_batch_stride, p.v_row_stride,
                          p.v_head_stride);
  cpu_gemm::pack_b(d, nb, k, 1, p.k_row_stride, kt, d * P);
  cpu_gemm::pack_b(d, nb, v, 1, p.v_row_stride, vt, d * P);
  cpu_gemm::pack_b(nb, d, k, p.k_row_stride, 1, kp, BN * P);
  std::fill(dk_acc, dk_acc + 2 * BN * d, acc_t(0));

  const acc_t scale = acc_t(p.softmax_scale);
  const acc_t softcap = acc_t(p.softcap);
  const acc_t alpha = acc_t(kSoftcap ? p.softmax_scale / p.softcap : p.softmax_scale);
  const acc_t* lse = static_cast<const acc_t*>(p.softmax_lse);
  const int64_t m_begin = seq.first_query(n0), m_end = seq.end_query(n0 + nb);

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const acc_t neg_slope = acc_t(-alibi_slope(p, b, h));
    const int64_t pack_h = h * d_panels * packs.total_q * P;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += BM) {
      const int64_t mb = std::min(BM, m_end - m0);
      const auto* q = row_ptr(static_cast<const scalar_t*>(p.q), p, b, seq, true, m0, h, p.q_batch_stride,
                              p.q_row_stride, p.q_head_stride);
      const auto* dout = row_ptr(static_cast<const scalar_t*>(p.dout), p, b, seq, true, m0, h, p.do_batch_stride,
                                 p.do_row_stride, p.do_head_stride);
      int64_t ldq, lddo;
      const acc_t* q_tile = load_tile(q, p.q_row_stride, mb, d, q_buf, ldq);
      const acc_t* do_tile = load_tile(dout, p.do_row_stride, mb, d, do_buf, lddo);
      const PackedB<acc_t> q_packed{packs.qp + pack_h, packs.total_q * P, qrow0 + m0};
      const PackedB<acc_t> do_packed{packs.dop + pack_h, packs.total_q * P, qrow0 + m0};

      cpu_gemm::gemm<acc_t>(mb, nb, d, alpha, q_tile, ldq, 1, {kt, d * P}, false, p_tile, nb);  // S = Q K^T
      for (int64_t r = 0; r < mb; ++r) {
        const int64_t i = m0 + r;
        acc_t* s = p_tile + r * nb;
        const int64_t c0 = std::max<int64_t>(seq.lo(i) - n0, 0), c1 = std::min<int64_t>(seq.hi(i) - n0, nb);
        if (c0 >= c1) {
          std::fill(s, s + nb, acc_t(0));
          continue;
        }
        prob_row<acc_t, kSoftcap, kAlibi>(s, dt_tile + r * nb, c0, c1, softcap, neg_slope,
                                          acc_t(i + seq.sk - seq.sq - n0), lse[lse_index(p, b, seq, h, i)]);
        std::fill(s, s + c0, acc_t(0));
        std::fill(s + c1, s + nb, acc_t(0));
      }
      cpu_gemm::gemm<acc_t>(nb, d, mb, acc_t(1), p_tile, 1, nb, do_packed, true, dv_acc, d);  // dV += P^T dO
      cpu_gemm::gemm<acc_t>(mb, nb, d, acc_t(1), do_tile, lddo, 1, {vt, d * P}, false, ds_tile, nb);  // dP = dO V^T
      const acc_t* delta_h = packs.delta + h * packs.total_q + qrow0 + m0;
      for (int64_t r = 0; r < mb; ++r) {  // dS = P * (dP - D) [* (1 - tanh^2)]
        const acc_t* pr = p_tile + r * nb;
        const acc_t* dtr = dt_tile + r * nb;
        acc_t* dsr = ds_tile + r * nb;
        const V dr(delta_h[r]);
        for (int64_t j = 0; j < nb; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), nb - j);
          V ds = vload(pr + j, n) * (vload(dsr + j, n) - dr);
          // dtanh outside a row's visible keys holds stale but finite values, and P is 0 there.
          if constexpr (kSoftcap) ds = ds * vload(dtr + j, n);
          vstore(ds, dsr + j, n);
        }
      }
      cpu_gemm::gemm<acc_t>(nb, d, mb, scale, ds_tile, 1, nb, q_packed, true, dk_acc, d);  // dK += dS^T Q
      acc_t* dq = dqt.base + (p.cu_seqlens_q ? 0 : b * dqt.batch_stride) + (seq.q_row0 + m0) * dqt.row_stride +
                  h * dqt.head_stride;
      cpu_gemm::gemm<acc_t>(mb, d, nb, scale, ds_tile, nb, 1, {kp, BN * P}, true, dq, dqt.row_stride);  // dQ += dS K
    }
  }
  auto* dk = row_ptr(static_cast<scalar_t*>(p.dk), p, b, seq, false, n0, hk, p.dk_batch_stride, p.dk_row_stride,
                     p.dk_head_stride);
  auto* dv = row_ptr(static_cast<scalar_t*>(p.dv), p, b, seq, false, n0, hk, p.dv_batch_stride, p.dv_row_stride,
                     p.dv_head_stride);
  store_rows<acc_t, scalar_t>(dk_acc, d, nb, d, nullptr, dk, p.dk_row_stride, q_buf);
  store_rows<acc_t, scalar_t>(dv_acc, d, nb, d, nullptr, dv, p.dv_row_stride, q_buf);
}

template <typename scalar_t>
void bwd_cpu(const BwdParams& p) {
  using acc_t = cpu::opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t BM = kBwdBlockM, BN = kBwdBlockN, P = kPanel<acc_t>;
  static_assert(BN % P == 0, "key blocks are whole panels");
  const int64_t d = p.headdim, H = p.nheads;
  const int64_t workers = at::get_num_threads();
  const int64_t total_q = p.cu_seqlens_q ? p.cu_seqlens_q[p.batch] : p.batch * p.seqlen_q;
  auto qrow0 = [&](int64_t b, const Seq& s) { return p.cu_seqlens_q ? s.q_row0 : b * p.seqlen_q; };

  BwdPacks<acc_t> packs{nullptr, nullptr, nullptr, total_q, ceil_div(d, P)};
  Scratch<acc_t> qp(kSlotPackA, H * packs.d_panels * total_q * P);
  Scratch<acc_t> dop(kSlotPackB, H * packs.d_panels * total_q * P);
  Scratch<acc_t> delta(kSlotRows, H * total_q);
  packs.qp = qp.get();
  packs.dop = dop.get();
  packs.delta = delta.get();
  // Pack Q and dO; D = rowsum(dO * O) - dlse (a gradient reaching lse adds dlse * P to dS).
  at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_o(d), row_do(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Seq s = get_seq(p, b);
      const int64_t pack_h = h * packs.d_panels * total_q * P;
      const auto* q = row_ptr(static_cast<const scalar_t*>(p.q), p, b, s, true, 0, h, p.q_batch_stride,
                              p.q_row_stride, p.q_head_stride);
      const auto* g = row_ptr(static_cast<const scalar_t*>(p.dout), p, b, s, true, 0, h, p.do_batch_stride,
                              p.do_row_stride, p.do_head_stride);
      const auto* o = row_ptr(static_cast<const scalar_t*>(p.out), p, b, s, true, 0, h, p.o_batch_stride,
                              p.o_row_stride, p.o_head_stride);
      cpu_gemm::pack_b(s.sq, d, q, p.q_row_stride, 1, qp.get() + pack_h, total_q * P, qrow0(b, s));
      cpu_gemm::pack_b(s.sq, d, g, p.do_row_stride, 1, dop.get() + pack_h, total_q * P, qrow0(b, s));
      for (int64_t i = 0; i < s.sq; ++i) {
        int64_t unused;
        const acc_t* ov = load_tile(o + i * p.o_row_stride, 0, 1, d, row_o.data(), unused);
        const acc_t* gv = load_tile(g + i * p.do_row_stride, 0, 1, d, row_do.data(), unused);
        V acc(acc_t(0));
        for (int64_t j = 0; j < d; j += V::size()) {
          const int64_t n = std::min<int64_t>(V::size(), d - j);
          acc = acc + vload(ov + j, n) * vload(gv + j, n);
        }
        acc_t dsum = at::vec::vec_reduce_all<acc_t>([](V x, V y) { return x + y; }, acc);
        if (p.dsoftmax_lse) dsum -= static_cast<const acc_t*>(p.dsoftmax_lse)[lse_index(p, b, s, h, i)];
        delta.get()[h * total_q + qrow0(b, s) + i] = dsum;
      }
    }
  });

  // Split the key blocks of each (sequence, kv-head) when there are too few of those to keep every
  // thread busy; split s takes key blocks s, s + nsplit, ... (interleaved, so causal work balances).
  const int64_t nkb = ceil_div(p.seqlen_k, BN);
  const int64_t pairs = p.batch * p.nheads_k;
  const int64_t nsplit = std::clamp<int64_t>(ceil_div(kTasksPerThread * workers, std::max<int64_t>(pairs, 1)), 1,
                                             std::clamp<int64_t>(nkb, 1, kMaxSplits));
  const bool direct = std::is_same_v<scalar_t, acc_t> && nsplit == 1;
  Scratch<acc_t> dq_accum(kSlotDq, direct ? 0 : nsplit * total_q * H * d);
  std::vector<DqTarget<acc_t>> targets(nsplit);
  auto dq_row = [&](int64_t r) {  // global query row -> its row of dq
    const int64_t b = p.cu_seqlens_q ? 0 : r / std::max<int64_t>(p.seqlen_q, 1);
    const int64_t i = p.cu_seqlens_q ? r : r % std::max<int64_t>(p.seqlen_q, 1);
    return static_cast<scalar_t*>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride;
  };
  if (direct) {
    targets[0] = {static_cast<acc_t*>(p.dq), p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride};
    at::parallel_for(0, total_q, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        auto* row = reinterpret_cast<acc_t*>(dq_row(r));
        for (int64_t h = 0; h < H; ++h) std::fill(row + h * p.dq_head_stride, row + h * p.dq_head_stride + d, acc_t(0));
      }
    });
  } else {
    std::fill(dq_accum.get(), dq_accum.get() + nsplit * total_q * H * d, acc_t(0));
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      // Laid out as a varlen tensor [total_q, heads, d]; batch mode rows are b * seqlen_q + i.
      targets[sp] = {dq_accum.get() + sp * total_q * H * d, p.cu_seqlens_q ? 0 : p.seqlen_q * H * d, H * d, d};
    }
  }

  const int64_t per_worker = 3 * BM * BN + 4 * BN * d + packs.d_panels * BN * P + 2 * BM * d;
  Scratch<acc_t> tiles(kSlotTiles, workers * per_worker);
  // The softcap derivative tile is read (times P = 0) where never written: start it finite.
  std::fill(tiles.get(), tiles.get() + workers * per_worker, acc_t(0));
  FASTDL_BOOL_SWITCH(p.softcap > 0, kSoftcap, [&] {
    FASTDL_BOOL_SWITCH(p.alibi_slopes != nullptr, kAlibi, [&] {
      parallel_items(pairs * nsplit, workers, [&](int64_t item, int64_t w) {
        const int64_t sp = item / pairs, b = item % pairs / p.nheads_k, hk = item % p.nheads_k;
        const Seq s = get_seq(p, b);
        for (int64_t kb = sp; kb * BN < s.sk; kb += nsplit) {
          bwd_key_block<scalar_t, kSoftcap, kAlibi>(p, packs, b, hk, kb * BN, s, qrow0(b, s), targets[sp],
                                                    tiles.get() + w * per_worker);
        }
      });
    });
  });

  if (direct) return;
  // dq = sum of the splits, in split order.
  at::parallel_for(0, total_q, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* dq = dq_row(r);
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* src = dq_accum.get() + (r * H + h) * d;
        std::copy(src, src + d, row.data());
        for (int64_t sp = 1; sp < nsplit; ++sp) {
          const acc_t* part = src + sp * total_q * H * d;
          for (int64_t j = 0; j < d; j += V::size()) {
            const int64_t n = std::min<int64_t>(V::size(), d - j);
            vstore(vload(row.data() + j, n) + vload(part + j, n), row.data() + j, n);
          }
        }
        store_rows<acc_t, scalar_t>(row.data(), d, 1, d, nullptr, dq + h * p.dq_head_stride, d, row.data());
      }
    }
  });
}

// ---- launchers ----------------------------------------------------------------------------------

void launch_fwd_cpu(const FwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_cpu<float>(p);
    case DType::kFloat64: return fwd_cpu<double>(p);
    case DType::kBFloat16: return fwd_cpu<c10::BFloat16>(p);
    case DType::kFloat16: return fwd_cpu<c10::Half>(p);
  }
}

void launch_bwd_cpu(const BwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_cpu<float>(p);
    case DType::kFloat64: return bwd_cpu<double>(p);
    case DType::kBFloat16: return bwd_cpu<c10::BFloat16>(p);
    case DType::kFloat16: return bwd_cpu<c10::Half>(p);
  }
}

}  // namespace
}  // namespace fastdl::flash_attn

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  FASTDL_REGISTER_FLASH_ATTN_IMPLS(m, fastdl::flash_attn::launch_fwd_cpu, fastdl::flash_attn::launch_bwd_cpu);
}
