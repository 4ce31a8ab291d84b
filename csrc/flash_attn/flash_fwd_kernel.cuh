// CUDA flash-attention forward (FlashAttention-2's algorithm, Dao 2023) for fp16/bf16 on sm_80+,
// with fp32 accumulation and fp32 softmax statistics. Same op and semantics as the CPU kernel
// (flash_attn_cpu.cpp): causal / sliding window (bottom-right aligned), softcap, ALiBi, GQA/MQA,
// varlen, any row/head/batch strides; rows that see no key give out = 0 and softmax_lse = +inf.
//
// One CTA = one block of kBlockM queries of one (sequence, head); 4 warps, each owning 16 kMTiles
// query rows. The CTA walks the key blocks its queries can see, kBlockN keys at a time:
//   S = Q K^T            tensor cores, Q and K from shared memory (ldmatrix), S in fp32 registers
//   x = scores (log2 units), masked to -inf only in tiles that straddle a mask edge
//   online softmax       per row: running max m, P = exp2(x - m), running sum l, rescale O by
//                        exp2(m_old - m_new); the 4 lanes sharing a row combine their max by shuffles
//   O += P V             P converted to fp16/bf16 in registers and used directly as the A operand
// and finally O / l and lse = ln 2 * m + ln l. A row's warp owns it entirely, so no shared memory is
// needed for the softmax. The K and V tiles are single-buffered with cp.async overlapping the math:
// V(j) loads while S(j) is computed, K(j + 1) while O += P V(j) runs.
//
// Shared memory: Q [kBlockM] + K [kBlockN] + V [kBlockN] rows of (headdim + 8) elements, chosen to
// stay within the 99 KB a block may use on sm_86/sm_89 (the sm_80 binary runs there too); see
// FwdConfig. Registers per thread: O is kMTiles * headdim / 2 floats, S kMTiles * kBlockN / 2.
#pragma once
#include <cuda_runtime.h>

#include "flash_attn/flash_common.cuh"
#include "flash_attn/flash_launch.h"

namespace fastdl::flash_attn {

template <int kHeadDim>
struct FwdConfig {
  static constexpr int kNWarps = 4;
  static constexpr int kThreads = kNWarps * 32;
  // Two 16-row tiles per warp where the O accumulator is small (headdim <= 64) reuse each K/V fragment
  // twice; above that one tile keeps O + S under ~200 registers.
  static constexpr int kMTiles = kHeadDim <= 64 ? 2 : 1;
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;
  // Above headdim 192, 32 keys at a time: with 64, the O (112 or 128 floats) and S accumulators
  // spilled (48 bytes at headdim 224 on sm_90); headdim 256 then needs 64 + 2 x 32 rows of 528 B = 66 KB.
  static constexpr int kBlockN = kHeadDim <= 192 ? 64 : 32;
  static constexpr int kPitch = kHeadDim + kPad;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kPitch * 2;
  static_assert(kSmemBytes <= 99 * 1024, "forward tiles must fit the 99 KB of sm_86/sm_89");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "padded head dims are multiples of 32 up to 256");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads) flash_fwd_kernel(const FwdParams p) {
  using Cfg = FwdConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kMT = Cfg::kMTiles, kPitch = Cfg::kPitch;
  constexpr int kNTilesS = kBlockN / 8, kNTilesO = kHeadDim / 8;

  extern __shared__ __align__(128) unsigned char flash_smem[];
  T* sQ = reinterpret_cast<T*>(flash_smem);  // [kBlockM][kPitch]; later the output staging tile
  T* sK = sQ + kBlockM * kPitch;             // [kBlockN][kPitch]
  T* sV = sK + kBlockN * kPitch;             // [kBlockN][kPitch]

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Seq seq = get_seq(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.sq) return;  // varlen: grid sized for the longest sequence
  const int hk = h / static_cast<int>(p.nheads / p.nheads_k);
  const int d = static_cast<int>(p.headdim);
  const int rows = min(kBlockM, seq.sq - m0);  // valid query rows of this block
  const ScoreMod score = make_score_mod(p, seq, b, h);

  const T* q = seq_ptr(static_cast<const T*>(p.q), b, seq.q_row0 + m0, h, p.q_batch_stride, p.q_row_stride,
                       p.q_head_stride);
  const T* k = seq_ptr(static_cast<const T*>(p.k), b, seq.k_row0, hk, p.k_batch_stride, p.k_row_stride,
                       p.k_head_stride);
  const T* v = seq_ptr(static_cast<const T*>(p.v), b, seq.k_row0, hk, p.v_batch_stride, p.v_row_stride,
                       p.v_head_stride);
  T* o = seq_ptr(static_cast<T*>(p.out), b, seq.q_row0 + m0, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  float* lse = static_cast<float*>(p.softmax_lse) + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_row0 + m0;

  const int n_lo = score.key_lo(m0), n_hi = score.key_hi(m0 + rows - 1);
  if (n_lo >= n_hi) {  // no query of the block sees a key
    zero_tile<kBlockM, kHeadDim, Cfg::kThreads>(o, p.o_row_stride, rows, d, threadIdx.x);
    for (int r = threadIdx.x; r < rows; r += Cfg::kThreads) st_global_f32(lse + r, INFINITY);
    return;
  }
  const int nb_first = n_lo / kBlockN, nb_end = cuda::ceil_div(n_hi, kBlockN);

  copy_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.q_row_stride, rows, d);
  copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k + nb_first * kBlockN * p.k_row_stride, p.k_row_stride,
                                                    seq.sk - nb_first * kBlockN, d);
  cp_async_commit();

  const int warp = threadIdx.x / 32;
  const int wm0 = warp * 16 * kMT;  // the warp's first row in the block
  float acc_o[kMT][kNTilesO][4];
  zero_acc(acc_o);
  // Per thread, rows r = (mt, half): acc_row(wm0, mt, 2 * half). row_sum is this lane's partial sum
  // over its columns; the 4 lanes of a row add theirs at the end.
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  for (int nb = nb_first; nb < nb_end; ++nb) {
    const int n0 = nb * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K(nb) (and Q) landed for every thread; every warp is done reading V(nb - 1)
    copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v + n0 * p.v_row_stride, p.v_row_stride, seq.sk - n0, d);
    cp_async_commit();

    float acc_s[kMT][kNTilesS][4];
    zero_acc(acc_s);
    gemm_ss<kMT, kNTilesS, kHeadDim, Major::kK, Major::kK>(acc_s, sQ, kPitch, wm0, sK, kPitch, 0);

    const bool mask = !score.all_visible(m0, m0 + rows - 1, n0, kBlockN);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float unused;
          acc_s[mt][nt][e] = score(acc_s[mt][nt][e], m0 + acc_row(wm0, mt, e), acc_col(n0, nt, e), mask, unused);
        }
      }
    }

    // Online softmax, per row.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * half], acc_s[mt][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[mt][half], mx);
        // A row with no visible key so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
        const float rescale = exp2_fast(row_max[mt][half] - m_sub);  // 0 on the first visible block
        row_max[mt][half] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float pe = exp2_fast(acc_s[mt][nt][e] - m_sub);
            acc_s[mt][nt][e] = pe;
            sum += pe;
          }
        }
        row_sum[mt][half] = row_sum[mt][half] * rescale + sum;
#pragma unroll
        for (int nt = 0; nt < kNTilesO; ++nt) {
          acc_o[mt][nt][2 * half] *= rescale;
          acc_o[mt][nt][2 * half + 1] *= rescale;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(nb) landed; every warp is done reading K(nb)
    if (nb + 1 < nb_end) {
      copy_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k + (n0 + kBlockN) * p.k_row_stride, p.k_row_stride,
                                                        seq.sk - n0 - kBlockN, d);
    }
    cp_async_commit();
    gemm_rs<kMT, kNTilesO, kBlockN, Major::kMN>(acc_o, acc_s, sV, kPitch, 0);
  }

  // Epilogue: O / l and the logsumexp; rows whose l is 0 saw no key (out 0, lse +inf).
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = row_sum[mt][half];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool seen = l > 0.0f;
      const float inv = seen ? 1.0f / l : 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
        acc_o[mt][nt][2 * half] *= inv;
        acc_o[mt][nt][2 * half + 1] *= inv;
      }
      const int r = acc_row(wm0, mt, 2 * half);
      if (lane % 4 == 0 && r < rows) st_global_f32(lse + r, seen ? row_max[mt][half] * kLn2 + logf(l) : INFINITY);
    }
  }
  // The warp's rows of sQ are its own (no other warp reads them, and its last read of them came before
  // the loop's final __syncthreads): stage O there and store it with 16-byte writes.
  acc_to_smem(sQ, kPitch, wm0, 0, acc_o, 1.0f);
  __syncwarp();
  store_tile<16 * kMT, kHeadDim, 32>(o + wm0 * p.o_row_stride, p.o_row_stride, sQ + wm0 * kPitch, rows - wm0, d, lane);
}

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd(const FwdParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<kHeadDim>;
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div<int64_t>(p.seqlen_q, Cfg::kBlockM)),
                  static_cast<unsigned>(p.nheads), static_cast<unsigned>(p.batch));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  return launch_kernel(flash_fwd_kernel<T, kHeadDim>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
}

}  // namespace fastdl::flash_attn
