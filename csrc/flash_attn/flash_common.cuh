// Pieces shared by the CUDA flash-attention kernels (flash_fwd_kernel.cuh, flash_bwd_kernel.cuh):
// where a sequence lives, the score function with its masks (one definition for forward and
// backward, matching FwdParams' comment and the CPU kernel), tile copies between global and shared
// memory, and warp-level GEMMs on m16n8k16 tensor-core tiles.
//
// Shared-memory tiles are row-major with a pitch of cols + 8 elements: 16 bytes of padding per row
// make consecutive rows start 16 or 80 bytes apart modulo 128 for every width used here (32 + 8 ..
// 256 + 8 elements), so the eight 16-byte rows that one ldmatrix reads (or that cp.async writes) fall
// into eight different bank groups. (A swizzle would save the padding; padding is simpler to check.)
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "flash_attn/flash_attn_params.h"
#include "flash_attn/flash_ptx.cuh"

namespace fastdl::flash_attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;
// The kernels index rows with int: sequences and windows are bounded by 2^30 (the binding checks the
// lengths; a longer window sees every key of such sequences, so it is clamped).
constexpr int64_t kMaxSeqlen = int64_t(1) << 30;

// Storage dtype -> element type.
template <DType D>
struct Element;
template <>
struct Element<DType::kFloat16> {
  using type = __half;
};
template <>
struct Element<DType::kBFloat16> {
  using type = __nv_bfloat16;
};

// ---- sequences ----------------------------------------------------------------------------------

// One sequence of the batch: its first rows in q / k (varlen; 0 in batch mode) and its lengths.
struct Seq {
  int64_t q_row0, k_row0;
  int sq, sk;
};

__device__ __forceinline__ Seq get_seq(const FwdParams& p, int b) {
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.sk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    s.q_row0 = 0;
    s.k_row0 = 0;
    s.sq = static_cast<int>(p.seqlen_q);
    s.sk = static_cast<int>(p.seqlen_k);
  }
  return s;
}

// Row 0 of sequence b, head h, of a [batch, seqlen, heads, d] or [total, heads, d] tensor (the batch
// stride is 0 in varlen mode, see set_fwd_params).
template <typename T>
__device__ __forceinline__ T* seq_ptr(T* base, int b, int64_t row0, int h, int64_t batch_stride, int64_t row_stride,
                                      int64_t head_stride) {
  return base + b * batch_stride + row0 * row_stride + h * head_stride;
}

// ---- scores and masks ---------------------------------------------------------------------------

// The score function of one (sequence, head), in log2 units so that the softmax runs on exp2
// (FlashAttention folds log2(e) into the softmax scale the same way):
//   x(i, j) = log2(e) * (softcap * tanh(softmax_scale * qk / softcap)  |  softmax_scale * qk)
//             - log2(e) * slope * |i + sk - sq - j|                      (ALiBi)
//           = -inf where query i does not see key j: j >= sk, j < i + sk - sq - window_left or
//             j > i + sk - sq + window_right (a negative window is unbounded on that side).
// Multiplying qk by the scale up front (rather than folding the scale into exp2's argument after the
// max, as FA2 does) keeps the max correct for any sign of softmax_scale.
struct ScoreMod {
  int sq, sk, diag;  // query i sits at key position i + diag (diag = sk - sq: bottom-right aligned)
  int wl, wr;        // window_left / window_right, < 0 when unbounded
  bool softcap, alibi;
  float scale_log2;    // softmax_scale * log2(e)
  float softcap_in;    // softmax_scale / softcap
  float softcap_log2;  // softcap * log2(e)
  float alibi_log2;    // -slope * log2(e)

  __device__ __forceinline__ bool visible(int i, int j) const {
    const int rel = j - i - diag;
    return j < sk && (wl < 0 || rel >= -wl) && (wr < 0 || rel <= wr);
  }

  // x(i, j) from qk = q_i . k_j; masked only when `mask` (tiles that need no mask skip the test).
  // With softcap, t receives tanh(softmax_scale * qk / softcap) for the backward's 1 - t^2.
  __device__ __forceinline__ float operator()(float qk, int i, int j, bool mask, float& t) const {
    float x;
    if (softcap) {
      t = tanhf(qk * softcap_in);
      x = t * softcap_log2;
    } else {
      x = qk * scale_log2;
    }
    if (alibi) x += alibi_log2 * fabsf(static_cast<float>(j - i - diag));
    if (mask && !visible(i, j)) x = -INFINITY;
    return x;
  }

  // Keys [key_lo(i0), key_hi(i1)) cover everything that queries i0..i1 see.
  __device__ __forceinline__ int key_lo(int i0) const {
    return wl < 0 ? 0 : static_cast<int>(clamp64(int64_t(i0) + diag - wl, 0, sk));
  }
  __device__ __forceinline__ int key_hi(int i1) const {
    return wr < 0 ? sk : static_cast<int>(clamp64(int64_t(i1) + diag + wr + 1, 0, sk));
  }
  // Queries [query_lo(j0), query_hi(j1)) cover every query that sees one of the keys j0..j1.
  __device__ __forceinline__ int query_lo(int j0) const {
    return wr < 0 ? 0 : static_cast<int>(clamp64(int64_t(j0) - diag - wr, 0, sq));
  }
  __device__ __forceinline__ int query_hi(int j1) const {
    return wl < 0 ? sq : static_cast<int>(clamp64(int64_t(j1) - diag + wl + 1, 0, sq));
  }
  // Whether every query of i0..i1 sees every key of j0 .. j0 + n - 1 (the tile needs no mask).
  __device__ __forceinline__ bool all_visible(int i0, int i1, int j0, int n) const {
    return j0 + n <= sk && (wl < 0 || int64_t(j0) - i1 - diag >= -wl) &&
           (wr < 0 || int64_t(j0) + n - 1 - i0 - diag <= wr);
  }

  __device__ __forceinline__ static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
  }
};

__device__ __forceinline__ ScoreMod make_score_mod(const FwdParams& p, const Seq& s, int b, int h) {
  ScoreMod m;
  m.sq = s.sq;
  m.sk = s.sk;
  m.diag = s.sk - s.sq;
  m.wl = p.window_left < 0 ? -1 : static_cast<int>(p.window_left < kMaxSeqlen ? p.window_left : kMaxSeqlen);
  m.wr = p.window_right < 0 ? -1 : static_cast<int>(p.window_right < kMaxSeqlen ? p.window_right : kMaxSeqlen);
  m.softcap = p.softcap > 0;
  m.scale_log2 = static_cast<float>(p.softmax_scale * 1.4426950408889634);
  m.softcap_in = m.softcap ? static_cast<float>(p.softmax_scale / p.softcap) : 0.0f;
  m.softcap_log2 = static_cast<float>(p.softcap * 1.4426950408889634);
  m.alibi = p.alibi_slopes != nullptr;
  m.alibi_log2 = m.alibi ? -p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e : 0.0f;
  return m;
}

// ---- global <-> shared tiles --------------------------------------------------------------------

// Starts copying a kRows x kCols tile into shared memory (pitch kCols + kPad): row r < rows, column
// c < cols comes from gmem[r * row_stride + c], everything else is zero. Rows must be 16-byte aligned
// and cols a multiple of 8. All kThreads threads call it; the caller commits and waits.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void copy_tile_async(T* smem, const T* gmem, int64_t row_stride, int rows, int cols) {
  constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool pred = r < rows && col < cols;
      cp_async_16(smem + r * (kCols + kPad) + col, pred ? gmem + r * row_stride + col : gmem, pred);
    }
  }
}

// Copies rows [0, rows) x columns [0, cols) of a shared tile (pitch kCols + kPad) to global memory in
// 16-byte stores. Threads tid = 0 .. kThreads - 1 take part (a warp for a warp-private tile).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T* gmem, int64_t row_stride, const T* smem, int rows, int cols, int tid) {
  constexpr int kChunks = kCols / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kThreads) {
    const int c = c0 + tid;
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      if (r < rows && col < cols) st_global_16(gmem + r * row_stride + col, ld_shared_16(smem + r * (kCols + kPad) + col));
    }
  }
}

// Writes zeros to rows [0, rows) x columns [0, cols) of a global tile (for outputs that see nothing).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void zero_tile(T* gmem, int64_t row_stride, int rows, int cols, int tid) {
  constexpr int kChunks = kCols / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kThreads) {
    const int c = c0 + tid;
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      if (r < rows && col < cols) st_global_16(gmem + r * row_stride + col, make_uint4(0, 0, 0, 0));
    }
  }
}

// ---- warp-level GEMMs on m16n8k16 tiles ---------------------------------------------------------
//
// A warp owns an accumulator tile of MT x NT 16x8 tiles, acc[mt][nt] holding rows m0 + 16 mt .. and
// columns n0 + 8 nt .. in the C layout of flash_ptx.cuh. Operands in shared memory are described by
// which index is contiguous: A (M x K) is Major::kK when stored [m][k] and Major::kMN when stored
// [k][m]; B (K x N) is Major::kK when stored [n][k] and Major::kMN when stored [k][n]. K-contiguous
// operands load with ldmatrix, MN-contiguous ones with ldmatrix.trans.

enum class Major { kK, kMN };

// A fragments of rows m0 .. m0 + 15, columns k0 .. k0 + 15. Lane l addresses row l % 8 of matrix
// l / 8; matrices 0..3 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15,
// k 8-15) = a0..a3.
template <Major kMajor, typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
  const int m = m0 + (mat & 1) * 8, k = k0 + (mat >> 1) * 8;
  if constexpr (kMajor == Major::kK) {
    ldmatrix_x4(a, s + (m + r) * ld + k);
  } else {
    ldmatrix_x4_trans(a, s + (k + r) * ld + m);
  }
}

// B fragments of columns n0 .. n0 + 8 NT - 1, rows k0 .. k0 + 15: b[nt] = {b0, b1}. Pairs of 8-column
// tiles load with one ldmatrix.x4 whose matrices are (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
// (n 8-15, k 8-15); an odd last tile with ldmatrix.x2.
template <int NT, Major kMajor, typename T>
__device__ __forceinline__ void load_b_frags(uint32_t (&b)[NT][2], const T* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
#pragma unroll
  for (int nt = 0; nt + 1 < NT; nt += 2) {
    const int n = n0 + nt * 8 + (mat >> 1) * 8, k = k0 + (mat & 1) * 8;
    uint32_t x[4];
    if constexpr (kMajor == Major::kK) {
      ldmatrix_x4(x, s + (n + r) * ld + k);
    } else {
      ldmatrix_x4_trans(x, s + (k + r) * ld + n);
    }
    b[nt][0] = x[0];
    b[nt][1] = x[1];
    b[nt + 1][0] = x[2];
    b[nt + 1][1] = x[3];
  }
  if constexpr (NT % 2 == 1) {
    // Lanes 0..15 give the addresses; 16..31 repeat them (ignored, but kept in bounds).
    const int n = n0 + (NT - 1) * 8, k = k0 + (mat & 1) * 8;
    uint32_t x[2];
    if constexpr (kMajor == Major::kK) {
      ldmatrix_x2(x, s + (n + r) * ld + k);
    } else {
      ldmatrix_x2_trans(x, s + (k + r) * ld + n);
    }
    b[NT - 1][0] = x[0];
    b[NT - 1][1] = x[1];
  }
}

// acc += A[m0 .., 0 .. K) * B[0 .. K, n0 ..), both operands in shared memory.
template <int MT, int NT, int K, Major kA, Major kB, typename T>
__device__ __forceinline__ void gemm_ss(float (&acc)[MT][NT][4], const T* sA, int lda, int m0, const T* sB, int ldb,
                                        int n0) {
  static_assert(K % 16 == 0, "gemm_ss: K must be a multiple of 16");
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a_frag<kA>(a[mt], sA, lda, m0 + mt * 16, k0);
    uint32_t b[NT][2];
    load_b_frags<NT, kB>(b, sB, ldb, n0, k0);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816<T>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  }
}

// The A fragment of k-step kk (columns 16 kk .. 16 kk + 15) of an M x K operand that is held as fp32
// accumulators c[mt][K / 8][4] (columns 8 j .. 8 j + 7 in c[mt][j]). The accumulator tiles 2 kk and
// 2 kk + 1 hold, per lane, exactly the elements a0..a3 need (row g: c0 c1, row g + 8: c2 c3).
template <typename T, int NK>
__device__ __forceinline__ void convert_a_frag(uint32_t (&a)[4], const float (&c)[NK][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc += A * B[0 .. K, n0 ..) with A (the warp's 16 MT rows x K) in registers as fp32 accumulators,
// rounded to T here (P in P V, dS in dS K), and B in shared memory.
template <int MT, int NT, int K, Major kB, typename T>
__device__ __forceinline__ void gemm_rs(float (&acc)[MT][NT][4], const float (&a_acc)[MT][K / 8][4], const T* sB,
                                        int ldb, int n0) {
  static_assert(K % 16 == 0, "gemm_rs: K must be a multiple of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) convert_a_frag<T>(a[mt], a_acc[mt], kk);
    uint32_t b[NT][2];
    load_b_frags<NT, kB>(b, sB, ldb, n0, kk * 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816<T>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  }
}

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    }
  }
}

// Writes a warp's accumulator tile, times `scale`, as T into a shared tile of pitch ld at (m0, n0).
template <int MT, int NT, typename T>
__device__ __forceinline__ void acc_to_smem(T* s, int ld, int m0, int n0, const float (&acc)[MT][NT][4],
                                            float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      T* p = s + (m0 + mt * 16 + g) * ld + n0 + nt * 8 + 2 * t;
      st_shared_4(p, pack2<T>(acc[mt][nt][0] * scale, acc[mt][nt][1] * scale));
      st_shared_4(p + 8 * ld, pack2<T>(acc[mt][nt][2] * scale, acc[mt][nt][3] * scale));
    }
  }
}

// Row / column of element e of accumulator tile (mt, nt) of a warp tile at (m0, n0).
__device__ __forceinline__ int acc_row(int m0, int mt, int e) {
  return m0 + mt * 16 + (threadIdx.x % 32) / 4 + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ int acc_col(int n0, int nt, int e) { return n0 + nt * 8 + 2 * (threadIdx.x % 4) + (e & 1); }

}  // namespace fastdl::flash_attn
