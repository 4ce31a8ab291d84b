// CUDA decode attention over a paged KV cache (flash-decoding, Dao et al. 2023, over vLLM's block table),
// and the cache writers. Torch-free: Params in, launch on a stream, cudaError_t out.
//
// attn_kernel: one CTA per (query tile, split of the keys, kv-head, sequence). A query tile is up to
// kMaxRows (query position, query head) rows of one kv-head's GQA group, so every K/V row the CTA reads
// serves the whole group. For each tile of kTileKeys keys:
//   1. K and V rows are looked up through the block table and copied into shared memory, 16 bytes per
//      thread per load (a key row of one head is one or two 128-byte lines);
//   2. each thread scores (row, key) pairs from shared memory in fp32: scale, softcap, ALiBi, masks;
//   3. one warp per row: running max, p = exp(s - max), running sum, rescale factor (online softmax);
//   4. each thread owns (row, column) outputs in registers: o = o * rescale + sum_j p_j v_j.
// With several splits, each writes (max, sum, unnormalised o) to a workspace and combine_kernel merges
// them: M = max m_s, l = sum l_s e^(m_s - M), o = sum o_s e^(m_s - M) / l, lse = M + log l.
//
// fp16 / bf16 storage, fp32 math. Instantiated in paged_attn_{fp16,bf16}.cu. Head dims are compiled for 64, 128 and 256; other multiples of 8 run in
// the next compiled size with zero-filled columns.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "paged_attn/paged_attn_launch.h"

namespace fastdl::paged_attn {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;

// Keys per shared-memory tile: 64 for head dims up to 128 (K + V tiles of 17 KB at d = 128), 32 at 256.
template <int kHeadDim>
constexpr int tile_keys() {
  return kHeadDim <= 128 ? 64 : 32;
}

// Shared memory of one CTA. K/V rows are padded by 8 elements (16 bytes) so that the 16-byte reads of
// step 2 (consecutive threads, consecutive keys) fall in distinct bank groups.
template <typename T, int kHeadDim>
struct SharedStorage {
  static constexpr int kTile = tile_keys<kHeadDim>();
  static constexpr int kPitch = kHeadDim + 8;
  float q[kMaxRows][kHeadDim];  // pre-scaled queries, zero past headdim and past the tile's rows
  T k[kTile][kPitch];
  T v[kTile][kPitch];
  float s[kMaxRows][kTile];     // scores, then probabilities
  float m[kMaxRows], l[kMaxRows], rescale[kMaxRows];
  int lo[kMaxRows], hi[kMaxRows];  // visible keys of each row
  float neg_slope[kMaxRows];
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h;
    memcpy(&h, &bits, 4);
    return __half22float2(h);
  } else {
    __nv_bfloat162 h;
    memcpy(&h, &bits, 4);
    return __bfloat1622float2(h);
  }
}

// Row j (token position) of kv-head hk of sequence b.
template <typename T>
__device__ __forceinline__ const T* cache_row(const T* base, const Params& p, int64_t b, int64_t j, int64_t hk,
                                              int64_t block_stride, int64_t row_stride, int64_t head_stride) {
  int64_t block = b, row = j;
  if (p.block_table != nullptr) {
    block = p.block_table[b * p.block_table_batch_stride + j / p.block_size];
    row = j % p.block_size;
  }
  return base + block * block_stride + row * row_stride + hk * head_stride;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) attn_kernel(const Params p, float* __restrict__ workspace) {
  using Smem = SharedStorage<T, kHeadDim>;
  constexpr int kTile = Smem::kTile;
  constexpr int kChunks = kHeadDim / 8;              // 16-byte chunks per row
  constexpr int kOut = kMaxRows * kHeadDim / kThreads;  // outputs per thread
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int nsplit = static_cast<int>(p.num_splits);
  const int split = blockIdx.x % nsplit, tile = blockIdx.x / nsplit;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int group = static_cast<int>(p.nheads / p.nheads_k), d = static_cast<int>(p.headdim);
  const int rows_total = static_cast<int>(p.seqlen_q) * group;
  const int r0 = tile * kMaxRows, nrows = min(kMaxRows, rows_total - r0);
  const int64_t sk = int64_t(p.cache_seqlens[b]) + p.seqlen_new, sq = p.seqlen_q;
  const bool softcap = p.softcap > 0;
  const float alpha = static_cast<float>(softcap ? p.softmax_scale / p.softcap : p.softmax_scale);
  const float cap = static_cast<float>(p.softcap);

  // Rows: visible key range, ALiBi slope, and the online-softmax state.
  if (tid < kMaxRows) {
    int lo = 0, hi = 0;
    float slope = 0.f;
    if (tid < nrows) {
      const int64_t i = (r0 + tid) / group, h = hk * group + (r0 + tid) % group;
      const int64_t diag = i + sk - sq;
      lo = p.window_left < 0 ? 0 : static_cast<int>(min(max(diag - p.window_left, int64_t(0)), sk));
      hi = p.window_right < 0 ? static_cast<int>(sk)
                              : static_cast<int>(min(max(diag + p.window_right + 1, int64_t(0)), sk));
      if (p.alibi_slopes != nullptr) slope = p.alibi_slopes[b * p.alibi_batch_stride + h];
    }
    sm.lo[tid] = lo;
    sm.hi[tid] = hi;
    sm.neg_slope[tid] = -slope;
    sm.m[tid] = -INFINITY;
    sm.l[tid] = 0.f;
  }
  // Queries, pre-scaled by alpha; zero past headdim and for missing rows.
  for (int c = tid; c < kMaxRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = c % kChunks * 8;
    float vals[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (r < nrows && col < d) {
      const int64_t i = (r0 + r) / group, h = hk * group + (r0 + r) % group;
      const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride + col;
      const uint4 raw = *reinterpret_cast<const uint4*>(q);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 f = to_float2<T>(words[w]);
        vals[2 * w] = f.x * alpha;
        vals[2 * w + 1] = f.y * alpha;
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sm.q[r][col + e] = vals[e];
  }
  __syncthreads();

  // This split's keys: the union of the rows' ranges, cut into num_splits pieces of whole tiles.
  int klo = static_cast<int>(sk), khi = 0;
  for (int r = 0; r < nrows; ++r) {
    if (sm.lo[r] < sm.hi[r]) {
      klo = min(klo, sm.lo[r]);
      khi = max(khi, sm.hi[r]);
    }
  }
  const int span = max(khi - klo, 0);
  const int per = (span + nsplit - 1) / nsplit;
  const int per_tiles = (per + kTile - 1) / kTile * kTile;
  const int a = min(khi, klo + split * per_tiles), e = min(khi, a + per_tiles);

  float o[kOut];
#pragma unroll
  for (int x = 0; x < kOut; ++x) o[x] = 0.f;

  const T* kbase = static_cast<const T*>(p.k_cache);
  const T* vbase = static_cast<const T*>(p.v_cache);
  for (int t0 = a; t0 < e; t0 += kTile) {
    const int n = min(kTile, e - t0);
    // 1. K and V rows into shared memory.
    for (int c = tid; c < kTile * kChunks; c += kThreads) {
      const int j = c / kChunks, col = c % kChunks * 8;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (j < n && col < d) {
        kv = *reinterpret_cast<const uint4*>(
            cache_row(kbase, p, b, t0 + j, hk, p.k_block_stride, p.k_row_stride, p.k_head_stride) + col);
        vv = *reinterpret_cast<const uint4*>(
            cache_row(vbase, p, b, t0 + j, hk, p.v_block_stride, p.v_row_stride, p.v_head_stride) + col);
      }
      *reinterpret_cast<uint4*>(&sm.k[j][col]) = kv;
      *reinterpret_cast<uint4*>(&sm.v[j][col]) = vv;
    }
    __syncthreads();
    // 2. scores of (row, key) pairs; -inf where the row does not see the key.
    for (int x = tid; x < kMaxRows * kTile; x += kThreads) {
      const int r = x / kTile, j = x % kTile;
      const int pos = t0 + j;
      float score = -INFINITY;
      if (r < nrows && j < n && pos >= sm.lo[r] && pos < sm.hi[r]) {
        float acc = 0.f;
#pragma unroll
        for (int col = 0; col < kHeadDim; col += 8) {
          const uint4 raw = *reinterpret_cast<const uint4*>(&sm.k[j][col]);
          const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const float2 f = to_float2<T>(words[w]);
            acc = fmaf(sm.q[r][col + 2 * w], f.x, acc);
            acc = fmaf(sm.q[r][col + 2 * w + 1], f.y, acc);
          }
        }
        if (softcap) acc = cap * tanhf(acc);
        const int64_t i = (r0 + r) / group;
        acc += sm.neg_slope[r] * fabsf(static_cast<float>(i + sk - sq - pos));
        score = acc;
      }
      sm.s[r][j] = score;
    }
    __syncthreads();
    // 3. online softmax, one warp per row.
    for (int r = warp; r < nrows; r += kWarps) {
      float mx = -INFINITY;
      for (int j = lane; j < kTile; j += 32) mx = fmaxf(mx, sm.s[r][j]);
      mx = warp_max(mx);
      const float m_old = sm.m[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int j = lane; j < kTile; j += 32) {
        const float pj = m_new == -INFINITY ? 0.f : __expf(sm.s[r][j] - m_new);
        sm.s[r][j] = pj;
        sum += pj;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float rescale = m_new == -INFINITY ? 1.f : __expf(m_old - m_new);  // 0 when m_old is -inf
        sm.rescale[r] = rescale;
        sm.l[r] = sm.l[r] * rescale + sum;
        sm.m[r] = m_new;
      }
    }
    for (int r = nrows + warp; r < kMaxRows; r += kWarps) {
      if (lane == 0) sm.rescale[r] = 1.f;
    }
    __syncthreads();
    // 4. o = o * rescale + P V for this thread's (row, column) outputs.
#pragma unroll
    for (int x = 0; x < kOut; ++x) {
      const int idx = tid + x * kThreads, r = idx / kHeadDim, col = idx % kHeadDim;
      float acc = o[x] * sm.rescale[r];
      for (int j = 0; j < n; ++j) {
        float vj;
        if constexpr (std::is_same_v<T, __half>) {
          vj = __half2float(sm.v[j][col]);
        } else {
          vj = __bfloat162float(sm.v[j][col]);
        }
        acc = fmaf(sm.s[r][j], vj, acc);
      }
      o[x] = acc;
    }
    __syncthreads();
  }

  if (nsplit > 1) {  // partial result for combine_kernel
    const int64_t ntiles = gridDim.x / nsplit;
    const int64_t slot = ((b * p.nheads_k + hk) * ntiles + tile) * nsplit + split;
    float* ml = workspace + slot * kMaxRows * 2;
    float* po = workspace + p.batch * p.nheads_k * ntiles * nsplit * kMaxRows * 2 + slot * kMaxRows * d;
    if (tid < nrows) {
      ml[2 * tid] = sm.m[tid];
      ml[2 * tid + 1] = sm.l[tid];
    }
#pragma unroll
    for (int x = 0; x < kOut; ++x) {
      const int idx = tid + x * kThreads, r = idx / kHeadDim, col = idx % kHeadDim;
      if (r < nrows && col < d) po[r * d + col] = o[x];
    }
    return;
  }
#pragma unroll
  for (int x = 0; x < kOut; ++x) {
    const int idx = tid + x * kThreads, r = idx / kHeadDim, col = idx % kHeadDim;
    if (r < nrows && col < d) {
      const float l = sm.l[r];
      const int64_t i = (r0 + r) / group, h = hk * group + (r0 + r) % group;
      T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
      out[col] = cuda::from_math<T>(l > 0.f ? o[x] / l : 0.f);
      if (col == 0) {
        static_cast<float*>(p.softmax_lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] =
            l > 0.f ? sm.m[r] + logf(l) : INFINITY;
      }
    }
  }
}

// Merges the splits of one (sequence, kv-head, tile); one CTA each.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Params p, const float* __restrict__ workspace) {
  const int nsplit = static_cast<int>(p.num_splits);
  const int64_t ntiles = (p.seqlen_q * (p.nheads / p.nheads_k) + kMaxRows - 1) / kMaxRows;
  const int64_t item = blockIdx.x;  // (b * nheads_k + hk) * ntiles + tile
  const int tile = static_cast<int>(item % ntiles);
  const int64_t hk = item / ntiles % p.nheads_k, b = item / ntiles / p.nheads_k;
  const int group = static_cast<int>(p.nheads / p.nheads_k), d = static_cast<int>(p.headdim);
  const int r0 = tile * kMaxRows, nrows = min(kMaxRows, static_cast<int>(p.seqlen_q) * group - r0);
  const float* ml = workspace + item * nsplit * kMaxRows * 2;
  const float* po = workspace + p.batch * p.nheads_k * ntiles * nsplit * kMaxRows * 2 + item * nsplit * kMaxRows * d;
  for (int x = threadIdx.x; x < nrows * d; x += kThreads) {
    const int r = x / d, col = x % d;
    float mx = -INFINITY;
    for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, ml[(s * kMaxRows + r) * 2]);
    float l = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
      for (int s = 0; s < nsplit; ++s) {
        const float ls = ml[(s * kMaxRows + r) * 2 + 1];
        if (ls == 0.f) continue;
        const float f = __expf(ml[(s * kMaxRows + r) * 2] - mx);
        l += ls * f;
        acc += po[(s * kMaxRows + r) * d + col] * f;
      }
    }
    const int64_t i = (r0 + r) / group, h = hk * group + (r0 + r) % group;
    T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    out[col] = cuda::from_math<T>(l > 0.f ? acc / l : 0.f);
    if (col == 0) {
      static_cast<float*>(p.softmax_lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] =
          l > 0.f ? mx + logf(l) : INFINITY;
    }
  }
}

// Host-compiler builds of the kernels (tests/ops/paged_emu) launch them their own way.
#ifndef FASTDL_PAGED_ATTN_HOST_EMULATION
template <typename T, int kHeadDim>
cudaError_t run_paged_attn(const Params& p, float* workspace, cudaStream_t stream) {
  const int64_t ntiles = num_tiles(p);
  const size_t smem = sizeof(SharedStorage<T, kHeadDim>);
  if (smem > 48 * 1024) {
    FASTDL_CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<T, kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(ntiles * p.num_splits), static_cast<unsigned>(p.nheads_k),
                  static_cast<unsigned>(p.batch));
  attn_kernel<T, kHeadDim><<<grid, kThreads, smem, stream>>>(p, workspace);
  FASTDL_CUDA_CHECK(cudaGetLastError());
  if (p.num_splits > 1) {
    combine_kernel<T><<<static_cast<unsigned>(p.batch * p.nheads_k * ntiles), kThreads, 0, stream>>>(p, workspace);
    FASTDL_CUDA_CHECK(cudaGetLastError());
  }
  return cudaSuccess;
}
#endif

}  // namespace fastdl::paged_attn
