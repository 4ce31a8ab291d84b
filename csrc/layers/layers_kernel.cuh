// CUDA kernels of the fused layer ops (torch-free; launchers in layers_launch.cu).
//
//   rms_norm forward: one warp per row; the row's sum of squares is a warp shuffle reduction, then the
//     warp rescales the row (the second read hits L1/L2: rows are a few KB).
//   rms_norm backward: dx by one warp per row as above; dweight deterministically, without atomics: one
//     thread per column sums g * x * rstd over a fixed block of rows (coalesced across the warp's columns),
//     then a second kernel adds the row blocks in order.
//   rotary_emb: one thread per (row, head, frequency) pair of outputs; cos / sin are read once per pair.
//   swiglu: one thread per element, grid-stride.
// All math in fp32 (fp64 for fp64); storage converts through cuda_utils.cuh's to_math / from_math.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "layers/layers_params.h"

namespace fastdl::layers {

using cuda::from_math;
using cuda::math_t;
using cuda::to_math;

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per 256-thread block in the row kernels
constexpr int kThreads = 256;

template <typename M>
__device__ __forceinline__ M warp_sum(M v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename M>
__device__ __forceinline__ M rsqrt_math(M v) {
  if constexpr (sizeof(M) == 8) {
    return ::rsqrt(v);
  } else {
    return rsqrtf(v);
  }
}

template <typename M>
__device__ __forceinline__ M sigmoid_math(M g) {
  if constexpr (sizeof(M) == 8) {
    return 1.0 / (1.0 + ::exp(-g));
  } else {
    return 1.0f / (1.0f + __expf(-g));  // __expf(-g) -> inf for g < -88: sigmoid 0, as it should
  }
}

template <typename T>
__global__ void rms_norm_fwd_kernel(RMSNormParams p) {
  using M = math_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= p.rows) return;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + row * p.cols;
  M ss = 0;
  for (int64_t c = lane; c < p.cols; c += kWarp) {
    const M v = to_math(x[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const M rs = rsqrt_math(ss / static_cast<M>(p.cols) + static_cast<M>(p.eps));
  if (lane == 0) static_cast<M*>(p.rstd)[row] = rs;
  for (int64_t c = lane; c < p.cols; c += kWarp) {
    M y = to_math(x[c]) * rs;
    if (w) y *= to_math(w[c]);
    out[c] = from_math<T>(y);
  }
}

// dx = rstd * (g w) - x * rstd^3 * <g w, x> / cols.
template <typename T>
__global__ void rms_norm_bwd_dx_kernel(RMSNormBwdParams p) {
  using M = math_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= p.rows) return;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* g = static_cast<const T*>(p.dout) + row * p.dout_row_stride;
  const T* w = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.dx) + row * p.cols;
  const M rs = static_cast<const M*>(p.rstd)[row];
  M dot = 0;
  for (int64_t c = lane; c < p.cols; c += kWarp) {
    M gw = to_math(g[c]);
    if (w) gw *= to_math(w[c]);
    dot += gw * to_math(x[c]);
  }
  const M b = rs * rs * rs * warp_sum(dot) / static_cast<M>(p.cols);
  for (int64_t c = lane; c < p.cols; c += kWarp) {
    M gw = to_math(g[c]);
    if (w) gw *= to_math(w[c]);
    dx[c] = from_math<T>(gw * rs - to_math(x[c]) * b);
  }
}

// partial[block, c] = sum over the block's rows of g[r, c] * x[r, c] * rstd[r]; grid (column tiles, blocks).
template <typename T>
__global__ void rms_norm_bwd_dweight_partial_kernel(RMSNormBwdParams p, int64_t rows_per_block) {
  using M = math_t<T>;
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.cols) return;
  const int64_t begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t end = begin + rows_per_block < p.rows ? begin + rows_per_block : p.rows;
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.dout);
  const M* rstd = static_cast<const M*>(p.rstd);
  M acc = 0;
  for (int64_t r = begin; r < end; ++r) {
    acc += to_math(g[r * p.dout_row_stride + c]) * to_math(x[r * p.x_row_stride + c]) * rstd[r];
  }
  static_cast<M*>(p.dweight_partial)[int64_t(blockIdx.y) * p.cols + c] = acc;
}

template <typename T>
__global__ void rms_norm_bwd_dweight_sum_kernel(RMSNormBwdParams p, int64_t blocks) {
  using M = math_t<T>;
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.cols) return;
  const M* partial = static_cast<const M*>(p.dweight_partial);
  M acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[b * p.cols + c];
  static_cast<T*>(p.dweight)[c] = from_math<T>(acc);
}

template <typename T>
__global__ void rotary_emb_kernel(RotaryParams p) {
  using M = math_t<T>;
  const int64_t half = p.headdim / 2;
  const int64_t total = p.batch * p.seqlen * p.nheads * half;
  const M sign = p.conjugate ? M(-1) : M(1);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, rest = idx / half;
    const int64_t h = rest % p.nheads, bt = rest / p.nheads;
    const int64_t b = bt / p.seqlen, t = bt % p.seqlen;
    const M c = static_cast<const M*>(p.cos)[b * p.cos_batch_stride + t * p.cos_seq_stride + i];
    const M s = sign * static_cast<const M*>(p.sin)[b * p.sin_batch_stride + t * p.sin_seq_stride + i];
    const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + t * p.x_seq_stride + h * p.x_head_stride;
    T* out = static_cast<T*>(p.out) + (bt * p.nheads + h) * p.headdim;
    const M x1 = to_math(x[i]), x2 = to_math(x[i + half]);
    out[i] = from_math<T>(x1 * c - x2 * s);
    out[i + half] = from_math<T>(x2 * c + x1 * s);
  }
}

template <typename T>
__global__ void swiglu_fwd_kernel(SwiGLUParams p) {
  using M = math_t<T>;
  const int64_t total = p.rows * p.cols;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / p.cols, c = idx % p.cols;
    const M g = to_math(static_cast<const T*>(p.gate)[r * p.gate_row_stride + c]);
    const M u = to_math(static_cast<const T*>(p.up)[r * p.up_row_stride + c]);
    static_cast<T*>(p.out)[idx] = from_math<T>(g * sigmoid_math(g) * u);
  }
}

// dup = dout * silu(g);  dgate = dout * up * s * (1 + g * (1 - s)),  s = sigmoid(g).
template <typename T>
__global__ void swiglu_bwd_kernel(SwiGLUBwdParams p) {
  using M = math_t<T>;
  const int64_t total = p.rows * p.cols;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / p.cols, c = idx % p.cols;
    const M g = to_math(static_cast<const T*>(p.gate)[r * p.gate_row_stride + c]);
    const M u = to_math(static_cast<const T*>(p.up)[r * p.up_row_stride + c]);
    const M d = to_math(static_cast<const T*>(p.dout)[r * p.dout_row_stride + c]);
    const M s = sigmoid_math(g);
    static_cast<T*>(p.dup)[idx] = from_math<T>(d * g * s);
    static_cast<T*>(p.dgate)[idx] = from_math<T>(d * u * s * (M(1) + g * (M(1) - s)));
  }
}

}  // namespace fastdl::layers
