// CUDA flash-attention backward for fp16/bf16 on sm_80+: recomputes P tile by tile from the saved
// logsumexp, never forming a seqlen_q x seqlen_k matrix (FlashAttention-2, Dao 2023, Algorithm 2).
// With x the scores in log2 units (ScoreMod), P = exp2(x - lse log2 e), and
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D) [* (1 - tanh^2) with softcap],
//   dK = softmax_scale dS^T Q,  dQ = softmax_scale dS K,  D = rowsum(dO * O) - dlse
// (dlse, a gradient reaching softmax_lse, adds dlse * P to the score gradient).
//
// Three kernels on the stream:
//   flash_bwd_dot_kernel   D for every (query, head) into an fp32 scratch [nheads, batch, seqlen_q]
//   flash_bwd_dkdv_kernel  one CTA per (key block, kv head): K, V stay in shared memory while the CTA
//                          walks the query blocks that see its keys, for every query head of its
//                          group (GQA/MQA sum over the group here, in registers); dK and dV are written
//                          once, in the storage type.
//   flash_bwd_dq_kernel    one CTA per (query block, head), walking its key blocks like the forward.
// FA2 instead adds dQ into an fp32 buffer with atomics from the dK/dV kernel. Recomputing S and dP in
// a separate dQ pass costs 7 tile GEMMs instead of 5, but needs no atomics, no dq_accum buffer and no
// conversion pass, and makes every gradient bitwise reproducible, as the Python API documents
// (`deterministic` is accepted and ignored).
//
// Tiling. dQ kernel: 4 warps over 64 query rows, as the forward (S, dP, dQ in registers; dS feeds the
// dS K MMA from registers). dK/dV kernel: 8 warps; S and dP (kBlockM x kBlockN) are tiled over a
// warp grid, P and dS go through shared memory in fp16/bf16 (FA2 does the same) so that dV += P^T dO
// and dK += dS^T Q can be tiled over a second warp grid of kBlockN x headdim. Tile sizes (BwdDkdvConfig)
// keep shared memory within the 99 KB of sm_86/sm_89 and the dK + dV accumulators within 112
// floats per thread.
#pragma once
#include <cuda_runtime.h>

#include <cstring>

#include "flash_attn/flash_common.cuh"
#include "flash_attn/flash_launch.h"

namespace fastdl::flash_attn {

struct BwdArgs {
  BwdParams p;
  float* dsum;  // [nheads, batch, seqlen_q]: D = rowsum(dO * O) - dlse (flash_launch.h)
};

// D of sequence b, head h, from query row 0 of the sequence.
__device__ __forceinline__ float* dsum_ptr(const BwdArgs& a, int b, int h) {
  return a.dsum + (h * a.p.batch + b) * a.p.seqlen_q;
}

// softmax_lse (or, with base = dsoftmax_lse, its gradient, which has its strides) of sequence b, head h,
// from query row 0 of the sequence.
__device__ __forceinline__ const float* lse_ptr(const BwdParams& p, int b, const Seq& s, int h, const void* base) {
  return static_cast<const float*>(base) + b * p.lse_batch_stride + h * p.lse_head_stride + s.q_row0;
}


// ---- D = rowsum(dO * O) - dlse ------------------------------------------------------------------------

constexpr int kDotThreads = 256;
constexpr int kDotLanes = 8;  // lanes per (row, head): 8 x 16 B covers a 64-element slice per step

template <typename T>
__global__ void __launch_bounds__(kDotThreads) flash_bwd_dot_kernel(const BwdArgs a) {
  const BwdParams& p = a.p;
  const int64_t pair = int64_t(blockIdx.x) * (kDotThreads / kDotLanes) + threadIdx.x / kDotLanes;
  const int sub = threadIdx.x % kDotLanes;
  // (b, i, h) with the heads of one query row adjacent (contiguous reads in the usual layouts).
  const int64_t bi = pair / p.nheads;
  const int h = static_cast<int>(pair % p.nheads);
  const int i = static_cast<int>(bi % p.seqlen_q);
  // Lanes past the last pair index sequence 0 and store nothing; every lane stays to the end, since
  // the reduction below shuffles across the whole warp.
  const bool in_grid = bi / p.seqlen_q < p.batch;
  const int b = in_grid ? static_cast<int>(bi / p.seqlen_q) : 0;
  const Seq seq = get_seq(p, b);
  const bool valid = in_grid && i < seq.sq;  // varlen: rows past the sequence's length
  const T* o = seq_ptr(static_cast<const T*>(p.out), b, seq.q_row0 + i, h, p.o_batch_stride, p.o_row_stride,
                       p.o_head_stride);
  const T* g = seq_ptr(static_cast<const T*>(p.dout), b, seq.q_row0 + i, h, p.do_batch_stride, p.do_row_stride,
                       p.do_head_stride);
  float acc = 0.0f;
  if (valid) {
    for (int c = sub * 8; c < p.headdim; c += kDotLanes * 8) {
      const uint4 ov = ld_global_16(o + c), gv = ld_global_16(g + c);
      T oe[8], ge[8];  // memcpy, not a pointer cast: reading a uint4 through T* breaks strict aliasing
      memcpy(oe, &ov, sizeof(ov));
      memcpy(ge, &gv, sizeof(gv));
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += cuda::to_math(oe[e]) * cuda::to_math(ge[e]);
    }
  }
#pragma unroll
  for (int s = kDotLanes / 2; s >= 1; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (valid && sub == 0) {
    if (p.dsoftmax_lse != nullptr) acc -= ld_global_f32(lse_ptr(p, b, seq, h, p.dsoftmax_lse) + i);
    st_global_f32(dsum_ptr(a, b, h) + i, acc);
  }
}

// ---- dK, dV -----------------------------------------------------------------------------------------

template <int kHeadDim>
struct BwdDkdvConfig {
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kBlockM = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : (kHeadDim <= 224 ? 64 : 32);
  // S, dP (kBlockM x kBlockN) over a kSWarpsM x kSWarpsN warp grid.
  static constexpr int kSWarpsM = kBlockM == 64 && kBlockN == 64 ? 4 : 2;
  static constexpr int kSWarpsN = kNWarps / kSWarpsM;
  static constexpr int kSMTiles = kBlockM / kSWarpsM / 16;
  static constexpr int kSNTiles = kBlockN / kSWarpsN / 8;
  // dK, dV (kBlockN x headdim) over a kKvWarpsN x kKvWarpsD warp grid, 16 key rows per warp.
  static constexpr int kKvWarpsN = kBlockN / 16 < kNWarps ? kBlockN / 16 : kNWarps;
  static constexpr int kKvWarpsD = kNWarps / kKvWarpsN;
  static constexpr int kKvMTiles = kBlockN / kKvWarpsN / 16;
  static constexpr int kKvNTiles = kHeadDim / kKvWarpsD / 8;
  static constexpr int kPitch = kHeadDim + kPad;
  static constexpr int kPitchP = kBlockN + kPad;
  // K, V [kBlockN], Q, dO [kBlockM] rows of kPitch; P, dS [kBlockM] rows of kPitchP.
  static constexpr int kSmemBytes = ((2 * kBlockN + 2 * kBlockM) * kPitch + 2 * kBlockM * kPitchP) * 2;
  static_assert(kSWarpsM * kSWarpsN == kNWarps && kSMTiles * kSWarpsM * 16 == kBlockM &&
                    kSNTiles * kSWarpsN * 8 == kBlockN,
                "S warp grid must tile kBlockM x kBlockN");
  static_assert(kKvWarpsN * kKvWarpsD == kNWarps && kKvMTiles * kKvWarpsN * 16 == kBlockN &&
                    kKvNTiles * kKvWarpsD * 8 == kHeadDim,
                "dK/dV warp grid must tile kBlockN x headdim");
  static_assert(kSmemBytes <= 99 * 1024, "backward tiles must fit the 99 KB of sm_86/sm_89");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdDkdvConfig<kHeadDim>::kThreads) flash_bwd_dkdv_kernel(const BwdArgs a) {
  using Cfg = BwdDkdvConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kPitchP = Cfg::kPitchP;
  const BwdParams& p = a.p;

  extern __shared__ __align__(128) unsigned char flash_smem[];
  T* sK = reinterpret_cast<T*>(flash_smem);  // [kBlockN][kPitch]; dK staging at the end
  T* sV = sK + kBlockN * kPitch;             // [kBlockN][kPitch]; dV staging at the end
  T* sQ = sV + kBlockN * kPitch;             // [kBlockM][kPitch]
  T* sdO = sQ + kBlockM * kPitch;            // [kBlockM][kPitch]
  T* sP = sdO + kBlockM * kPitch;            // [kBlockM][kPitchP]
  T* sdS = sP + kBlockM * kPitchP;           // [kBlockM][kPitchP]

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const Seq seq = get_seq(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.sk) return;
  const int d = static_cast<int>(p.headdim);
  const int keys = min(kBlockN, seq.sk - n0);  // valid key rows of this block
  const int group = static_cast<int>(p.nheads / p.nheads_k);

  const T* k = seq_ptr(static_cast<const T*>(p.k), b, seq.k_row0 + n0, hk, p.k_batch_stride, p.k_row_stride,
                       p.k_head_stride);
  const T* v = seq_ptr(static_cast<const T*>(p.v), b, seq.k_row0 + n0, hk, p.v_batch_stride, p.v_row_stride,
                       p.v_head_stride);
  T* dk = seq_ptr(static_cast<T*>(p.dk), b, seq.k_row0 + n0, hk, p.dk_batch_stride, p.dk_row_stride,
                  p.dk_head_stride);
  T* dv = seq_ptr(static_cast<T*>(p.dv), b, seq.k_row0 + n0, hk, p.dv_batch_stride, p.dv_row_stride,
                  p.dv_head_stride);

  const int warp = threadIdx.x / 32;
  const int ws_m0 = (warp / Cfg::kSWarpsN) * (kBlockM / Cfg::kSWarpsM);  // the warp's S tile
  const int ws_n0 = (warp % Cfg::kSWarpsN) * (kBlockN / Cfg::kSWarpsN);
  const int wn0 = (warp / Cfg::kKvWarpsD) * (kBlockN / Cfg::kKvWarpsN);  // the warp's dK/dV tile
  const int wd0 = (warp % Cfg::kKvWarpsD) * (kHeadDim / Cfg::kKvWarpsD);
  float acc_dk[Cfg::kKvMTiles][Cfg::kKvNTiles][4], acc_dv[Cfg::kKvMTiles][Cfg::kKvNTiles][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  // The queries that see a key of this block; masks do not depend on the head (ALiBi does not mask).
  const ScoreMod range = make_score_mod(p, seq, b, hk * group);
  const int i_lo = range.query_lo(n0), i_hi = range.query_hi(n0 + keys - 1);
  if (i_lo < i_hi) {
    copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k_row_stride, keys, d);
    copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v_row_stride, keys, d);
    cp_async_commit();
    for (int hg = 0; hg < group; ++hg) {
      const int h = hk * group + hg;
      const ScoreMod score = make_score_mod(p, seq, b, h);
      const T* q = seq_ptr(static_cast<const T*>(p.q), b, seq.q_row0, h, p.q_batch_stride, p.q_row_stride,
                           p.q_head_stride);
      const T* dout = seq_ptr(static_cast<const T*>(p.dout), b, seq.q_row0, h, p.do_batch_stride, p.do_row_stride,
                              p.do_head_stride);
      const float* lse = lse_ptr(p, b, seq, h, p.softmax_lse);
      const float* dsum = dsum_ptr(a, b, h);
      for (int m0 = i_lo / kBlockM * kBlockM; m0 < i_hi; m0 += kBlockM) {
        const int rows = min(kBlockM, seq.sq - m0);
        copy_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q + m0 * p.q_row_stride, p.q_row_stride, rows, d);
        cp_async_commit();
        copy_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sdO, dout + m0 * p.do_row_stride, p.do_row_stride, rows, d);
        cp_async_commit();

        // Per thread rows of the S tile: log2-scaled lse and D; rows past the sequence get P = 0.
        float lse_log2[Cfg::kSMTiles][2], dsum_r[Cfg::kSMTiles][2];
#pragma unroll
        for (int mt = 0; mt < Cfg::kSMTiles; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int r = acc_row(ws_m0, mt, 2 * half);
            lse_log2[mt][half] = r < rows ? ld_global_f32(lse + m0 + r) * kLog2e : INFINITY;
            dsum_r[mt][half] = r < rows ? ld_global_f32(dsum + m0 + r) : 0.0f;
          }
        }

        cp_async_wait<1>();
        __syncthreads();  // Q (and K, V) landed
        float acc_s[Cfg::kSMTiles][Cfg::kSNTiles][4], acc_dp[Cfg::kSMTiles][Cfg::kSNTiles][4];
        zero_acc(acc_s);
        gemm_ss<Cfg::kSMTiles, Cfg::kSNTiles, kHeadDim, Major::kK, Major::kK>(acc_s, sQ, kPitch, ws_m0, sK, kPitch,
                                                                             ws_n0);
        cp_async_wait<0>();
        __syncthreads();  // dO landed
        zero_acc(acc_dp);
        gemm_ss<Cfg::kSMTiles, Cfg::kSNTiles, kHeadDim, Major::kK, Major::kK>(acc_dp, sdO, kPitch, ws_m0, sV, kPitch,
                                                                             ws_n0);

        const bool mask = !score.all_visible(m0, m0 + rows - 1, n0, kBlockN);
#pragma unroll
        for (int mt = 0; mt < Cfg::kSMTiles; ++mt) {
#pragma unroll
          for (int nt = 0; nt < Cfg::kSNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float t = 0.0f;
              const float x = score(acc_s[mt][nt][e], m0 + acc_row(ws_m0, mt, e), n0 + acc_col(ws_n0, nt, e), mask, t);
              const float pr = exp2_fast(x - lse_log2[mt][e / 2]);
              float ds = pr * (acc_dp[mt][nt][e] - dsum_r[mt][e / 2]);
              if (score.softcap) ds *= 1.0f - t * t;
              acc_s[mt][nt][e] = pr;
              acc_dp[mt][nt][e] = ds;
            }
          }
        }
        acc_to_smem(sP, kPitchP, ws_m0, ws_n0, acc_s, 1.0f);
        acc_to_smem(sdS, kPitchP, ws_m0, ws_n0, acc_dp, 1.0f);
        __syncthreads();  // P, dS complete

        // dV += P^T dO and dK += dS^T Q: A = P^T / dS^T (stored [m][n], i.e. M-contiguous for rows n),
        // B = dO / Q (stored [m][d], N-contiguous).
        gemm_ss<Cfg::kKvMTiles, Cfg::kKvNTiles, kBlockM, Major::kMN, Major::kMN>(acc_dv, sP, kPitchP, wn0, sdO, kPitch,
                                                                                 wd0);
        gemm_ss<Cfg::kKvMTiles, Cfg::kKvNTiles, kBlockM, Major::kMN, Major::kMN>(acc_dk, sdS, kPitchP, wn0, sQ, kPitch,
                                                                                 wd0);
        __syncthreads();  // every warp is done with Q, dO, P, dS before the next block overwrites them
      }
    }
  }

  // Stage dK (times softmax_scale) and dV in the K and V tiles, then store whole rows.
  acc_to_smem(sK, kPitch, wn0, wd0, acc_dk, static_cast<float>(p.softmax_scale));
  acc_to_smem(sV, kPitch, wn0, wd0, acc_dv, 1.0f);
  __syncthreads();
  store_tile<kBlockN, kHeadDim, Cfg::kThreads>(dk, p.dk_row_stride, sK, keys, d, threadIdx.x);
  store_tile<kBlockN, kHeadDim, Cfg::kThreads>(dv, p.dv_row_stride, sV, keys, d, threadIdx.x);
}

// ---- dQ -------------------------------------------------------------------------------------------------

template <int kHeadDim>
struct BwdDqConfig {
  static constexpr int kNWarps = 4;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMTiles = 1;
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;
  // dQ (headdim / 2 floats per thread) + S + dP (kBlockN / 2 each): 32 keys above headdim 160.
  static constexpr int kBlockN = kHeadDim <= 160 ? 64 : 32;
  static constexpr int kPitch = kHeadDim + kPad;
  // Q, dO [kBlockM] and K, V [kBlockN] rows of kPitch (headdim 256: exactly 99 KB).
  static constexpr int kSmemBytes = (2 * kBlockM + 2 * kBlockN) * kPitch * 2;
  static_assert(kSmemBytes <= 99 * 1024, "backward tiles must fit the 99 KB of sm_86/sm_89");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdDqConfig<kHeadDim>::kThreads) flash_bwd_dq_kernel(const BwdArgs a) {
  using Cfg = BwdDqConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kMT = Cfg::kMTiles, kPitch = Cfg::kPitch;
  constexpr int kNTilesS = kBlockN / 8, kNTilesD = kHeadDim / 8;
  const BwdParams& p = a.p;

  extern __shared__ __align__(128) unsigned char flash_smem[];
  T* sQ = reinterpret_cast<T*>(flash_smem);  // [kBlockM][kPitch]; dQ staging at the end
  T* sdO = sQ + kBlockM * kPitch;            // [kBlockM][kPitch]
  T* sK = sdO + kBlockM * kPitch;            // [kBlockN][kPitch]
  T* sV = sK + kBlockN * kPitch;             // [kBlockN][kPitch]

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Seq seq = get_seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.sq) return;
  const int hk = h / static_cast<int>(p.nheads / p.nheads_k);
  const int d = static_cast<int>(p.headdim);
  const int rows = min(kBlockM, seq.sq - m0);
  const ScoreMod score = make_score_mod(p, seq, b, h);

  const T* q = seq_ptr(static_cast<const T*>(p.q), b, seq.q_row0 + m0, h, p.q_batch_stride, p.q_row_stride,
                       p.q_head_stride);
  const T* dout = seq_ptr(static_cast<const T*>(p.dout), b, seq.q_row0 + m0, h, p.do_batch_stride, p.do_row_stride,
                          p.do_head_stride);
  const T* k = seq_ptr(static_cast<const T*>(p.k), b, seq.k_row0, hk, p.k_batch_stride, p.k_row_stride,
                       p.k_head_stride);
  const T* v = seq_ptr(static_cast<const T*>(p.v), b, seq.k_row0, hk, p.v_batch_stride, p.v_row_stride,
                       p.v_head_stride);
  T* dq = seq_ptr(static_cast<T*>(p.dq), b, seq.q_row0 + m0, h, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);

  const int n_lo = score.key_lo(m0), n_hi = score.key_hi(m0 + rows - 1);
  if (n_lo >= n_hi) {  // no query of the block sees a key: dQ = 0
    zero_tile<kBlockM, kHeadDim, Cfg::kThreads>(dq, p.dq_row_stride, rows, d, threadIdx.x);
    return;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = warp * 16 * kMT;
  const float* lse = lse_ptr(p, b, seq, h, p.softmax_lse) + m0;
  const float* dsum = dsum_ptr(a, b, h) + m0;
  float lse_log2[kMT][2], dsum_r[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = acc_row(wm0, mt, 2 * half);
      lse_log2[mt][half] = r < rows ? ld_global_f32(lse + r) * kLog2e : INFINITY;
      dsum_r[mt][half] = r < rows ? ld_global_f32(dsum + r) : 0.0f;
    }
  }

  copy_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.q_row_stride, rows, d);
  copy_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sdO, dout, p.do_row_stride, rows, d);
  float acc_dq[kMT][kNTilesD][4];
  zero_acc(acc_dq);

  for (int n0 = n_lo / kBlockN * kBlockN; n0 < n_hi; n0 += kBlockN) {
    copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k + n0 * p.k_row_stride, p.k_row_stride, seq.sk - n0, d);
    cp_async_commit();  // the first group also carries Q and dO
    copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v + n0 * p.v_row_stride, p.v_row_stride, seq.sk - n0, d);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // K (and Q, dO) landed
    float acc_s[kMT][kNTilesS][4], acc_dp[kMT][kNTilesS][4];
    zero_acc(acc_s);
    gemm_ss<kMT, kNTilesS, kHeadDim, Major::kK, Major::kK>(acc_s, sQ, kPitch, wm0, sK, kPitch, 0);
    cp_async_wait<0>();
    __syncthreads();  // V landed
    zero_acc(acc_dp);
    gemm_ss<kMT, kNTilesS, kHeadDim, Major::kK, Major::kK>(acc_dp, sdO, kPitch, wm0, sV, kPitch, 0);

    const bool mask = !score.all_visible(m0, m0 + rows - 1, n0, kBlockN);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float t = 0.0f;
          const float x = score(acc_s[mt][nt][e], m0 + acc_row(wm0, mt, e), acc_col(n0, nt, e), mask, t);
          const float pr = exp2_fast(x - lse_log2[mt][e / 2]);
          float ds = pr * (acc_dp[mt][nt][e] - dsum_r[mt][e / 2]);
          if (score.softcap) ds *= 1.0f - t * t;
          acc_dp[mt][nt][e] = ds;
        }
      }
    }
    // dQ += dS K: dS from registers, K (stored [n][d]) as an N-contiguous B.
    gemm_rs<kMT, kNTilesD, kBlockN, Major::kMN>(acc_dq, acc_dp, sK, kPitch, 0);
    __syncthreads();  // every warp is done with K and V before the next block overwrites them
  }

  // The warp's rows of sQ are its own: stage dQ (times softmax_scale) there.
  acc_to_smem(sQ, kPitch, wm0, 0, acc_dq, static_cast<float>(p.softmax_scale));
  __syncwarp();
  store_tile<16 * kMT, kHeadDim, 32>(dq + wm0 * p.dq_row_stride, p.dq_row_stride, sQ + wm0 * kPitch, rows - wm0, d,
                                     lane);
}

template <typename T, int kHeadDim>
cudaError_t run_flash_bwd(const BwdParams& p, float* dsum, cudaStream_t stream) {
  const BwdArgs args{p, dsum};
  const int64_t pairs = p.nheads * p.batch * p.seqlen_q;
  if (pairs > 0) {
    const dim3 grid(static_cast<unsigned>(cuda::ceil_div<int64_t>(pairs, kDotThreads / kDotLanes)));
    FASTDL_CUDA_CHECK(launch_kernel(flash_bwd_dot_kernel<T>, grid, kDotThreads, 0, stream, args));
  }
  using KvCfg = BwdDkdvConfig<kHeadDim>;
  const dim3 kv_grid(static_cast<unsigned>(cuda::ceil_div<int64_t>(p.seqlen_k, KvCfg::kBlockN)),
                     static_cast<unsigned>(p.nheads_k), static_cast<unsigned>(p.batch));
  if (kv_grid.x > 0 && kv_grid.y > 0 && kv_grid.z > 0) {
    FASTDL_CUDA_CHECK(
        launch_kernel(flash_bwd_dkdv_kernel<T, kHeadDim>, kv_grid, KvCfg::kThreads, KvCfg::kSmemBytes, stream, args));
  }
  using QCfg = BwdDqConfig<kHeadDim>;
  const dim3 q_grid(static_cast<unsigned>(cuda::ceil_div<int64_t>(p.seqlen_q, QCfg::kBlockM)),
                    static_cast<unsigned>(p.nheads), static_cast<unsigned>(p.batch));
  if (q_grid.x > 0 && q_grid.y > 0 && q_grid.z > 0) {
    FASTDL_CUDA_CHECK(
        launch_kernel(flash_bwd_dq_kernel<T, kHeadDim>, q_grid, QCfg::kThreads, QCfg::kSmemBytes, stream, args));
  }
  return cudaSuccess;
}

}  // namespace fastdl::flash_attn
