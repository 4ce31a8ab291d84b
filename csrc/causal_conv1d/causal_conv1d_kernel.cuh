// CUDA depthwise causal conv1d: forward (+ silu), backward and the decoding update. Torch-free: params
// structs of causal_conv1d_params.h, raw pointers, launchers taking a cudaStream_t.
//
// The convolution is memory-bound (width <= 8 FMAs per element), so the kernels aim at one read of x and
// one write of out: a block of kConvThreads threads covers kConvTile = 512 consecutive steps of one
// (batch, channel) row, each thread kConvItems = 4 consecutive outputs, reading the width - 1 inputs before
// its first step again (from L1/L2: the neighbouring thread has just read them). Width is a runtime value
// (2..8): the weights sit in a register array of kMaxWidth, loops run to kMaxWidth with a guard, so one
// instantiation serves every width.
//
// Backward: with pre = bias + sum_k w[k] x[t - (W-1) + k] and dpre = dout * act'(pre),
//   dx[t] = sum_k w[k] dpre[t + (W-1) - k],   dw[k] = sum_t dpre[t] x[t - (W-1) + k],   dbias = sum_t dpre[t].
// Each thread recomputes pre over its steps and the W - 1 after them. dw / dbias are summed per block
// (warp shuffles, then the 4 warps in order) into a [batch, tiles, dim, W + 1] scratch, then over batch and
// tiles by a second kernel in a fixed order: deterministic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "causal_conv1d/causal_conv1d_params.h"
#include "common/cuda_simt.cuh"
#include "common/cuda_utils.cuh"

namespace fastdl::causal_conv1d {

constexpr int kConvThreads = 128;
constexpr int kConvWarps = kConvThreads / 32;
constexpr int kConvItems = 4;
constexpr int kConvTile = kConvThreads * kConvItems;

struct ConvBwdArgs {
  ConvBwdParams p;
  float* part;  // [batch, n_tiles, dim, width + 1]: dweight[0..width) and dbias per block
  int64_t n_tiles;
};

namespace conv_detail {

using cuda::sld;
using cuda::sst;
using cuda::to_math;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Weights of channel d (zero past width) and its bias.
template <typename W>
__device__ __forceinline__ void load_weights(const W* weight, int64_t d_off, int64_t w_stride, int width,
                                             const W* bias, int64_t bias_off, float (&w)[kMaxWidth], float& b) {
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) w[k] = k < width ? to_math(weight[d_off + k * w_stride]) : 0.0f;
  b = bias ? to_math(bias[bias_off]) : 0.0f;
}

// Grid (batch * dim, tiles of L).
template <typename T, typename W>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_fwd_kernel(const ConvParams p) {
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, L = p.seqlen;
  const int width = static_cast<int>(p.width), pad = width - 1;
  float w[kMaxWidth], bias;
  load_weights(static_cast<const W*>(p.weight), d * p.weight_d_stride, p.weight_w_stride, width,
               static_cast<const W*>(p.bias), d * p.bias_stride, w, bias);
  const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + d * p.x_d_stride;
  T* out = static_cast<T*>(p.out) + row * L;
  const int64_t t0 = int64_t(blockIdx.y) * kConvTile + int64_t(threadIdx.x) * kConvItems;
  // xs[j] = x[t0 - pad + j], zero before 0 and past the end.
  float xs[kConvItems + kMaxWidth - 1];
#pragma unroll
  for (int j = 0; j < kConvItems + kMaxWidth - 1; ++j) {
    const int64_t t = t0 - pad + j;
    xs[j] = (j < kConvItems + pad && t >= 0 && t < L) ? to_math(x[t * p.x_l_stride]) : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < kConvItems; ++i) {
    const int64_t t = t0 + i;
    if (t >= L) break;
    float acc = bias;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) acc += w[k] * xs[i + k];  // w[k] = 0 for k >= width
    out[t] = cuda::from_math<T>(p.silu ? acc * sigmoid(acc) : acc);
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_bwd_kernel(const ConvBwdArgs a) {
  const ConvBwdParams& p = a.p;
  float* red = reinterpret_cast<float*>(cuda::dynamic_smem());  // [kConvWarps][kMaxWidth + 1]
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, L = p.seqlen;
  const int width = static_cast<int>(p.width), pad = width - 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float w[kMaxWidth], bias;
  load_weights(static_cast<const W*>(p.weight), d * p.weight_d_stride, p.weight_w_stride, width,
               static_cast<const W*>(p.bias), d * p.bias_stride, w, bias);
  const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + d * p.x_d_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + d * p.dout_d_stride;
  const int64_t t0 = int64_t(blockIdx.y) * kConvTile + int64_t(threadIdx.x) * kConvItems;
  constexpr int kSpan = kConvItems + 2 * (kMaxWidth - 1);
  // xs[j] = x[t0 - pad + j] for j < kConvItems + 2 pad (zero outside [0, L)).
  float xs[kSpan];
#pragma unroll
  for (int j = 0; j < kSpan; ++j) {
    const int64_t t = t0 - pad + j;
    xs[j] = (j < kConvItems + 2 * pad && t >= 0 && t < L) ? to_math(x[t * p.x_l_stride]) : 0.0f;
  }
  // dp[i] = dpre[t0 + i] for i < kConvItems + pad (zero past L).
  float dp[kConvItems + kMaxWidth - 1];
#pragma unroll
  for (int i = 0; i < kConvItems + kMaxWidth - 1; ++i) {
    const int64_t t = t0 + i;
    dp[i] = 0.0f;
    if (i < kConvItems + pad && t < L) {
      float g = to_math(dout[t * p.dout_l_stride]);
      if (p.silu) {
        float s = bias;
#pragma unroll
        for (int k = 0; k < kMaxWidth; ++k) s += w[k] * xs[i + k];
        const float sg = sigmoid(s);
        g *= sg * (1.0f + s * (1.0f - sg));
      }
      dp[i] = g;
    }
  }
  // wr[m] = w[pad - m]: dx[t] = sum_m wr[m] dpre[t + m], with register indices known at compile time.
  float wr[kMaxWidth];
  const W* weight = static_cast<const W*>(p.weight) + d * p.weight_d_stride;
#pragma unroll
  for (int m = 0; m < kMaxWidth; ++m) wr[m] = m <= pad ? to_math(weight[(pad - m) * p.weight_w_stride]) : 0.0f;
  T* dx = static_cast<T*>(p.dx) + row * L;
  float dw[kMaxWidth + 1];
#pragma unroll
  for (int k = 0; k <= kMaxWidth; ++k) dw[k] = 0.0f;
#pragma unroll
  for (int i = 0; i < kConvItems; ++i) {
    const int64_t t = t0 + i;
    if (t >= L) break;
    float acc = 0.0f;
#pragma unroll
    for (int m = 0; m < kMaxWidth; ++m) acc += wr[m] * dp[i + m];  // wr[m] = 0 past pad
    dx[t] = cuda::from_math<T>(acc);
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) dw[k] += dp[i] * xs[i + k];  // x[t - pad + k]
    dw[kMaxWidth] += dp[i];
  }
#pragma unroll
  for (int k = 0; k <= kMaxWidth; ++k) {
#pragma unroll
    for (int m = 16; m > 0; m /= 2) dw[k] += cuda::shfl_xor(dw[k], m);
  }
  if (lane == 0)
    for (int k = 0; k <= kMaxWidth; ++k) sst(red + warp * (kMaxWidth + 1) + k, dw[k]);
  __syncthreads();
  if (threadIdx.x <= static_cast<unsigned>(width)) {
    const int k = threadIdx.x == static_cast<unsigned>(width) ? kMaxWidth : static_cast<int>(threadIdx.x);
    float s = 0.0f;
    for (int v = 0; v < kConvWarps; ++v) s += sld(red + v * (kMaxWidth + 1) + k);
    a.part[((b * a.n_tiles + blockIdx.y) * p.dim + d) * (width + 1) + threadIdx.x] = s;
  }
}

// dweight[d, k] and dbias[d]: sums of the blocks' partials over batch and tiles, in that order.
template <typename W>
struct ConvReduceArgs {
  const float* part;
  W* dweight;  // [dim, width], contiguous
  W* dbias;    // [dim]
  int64_t dim, width, groups;  // groups = batch * n_tiles
};

template <typename W>
__global__ void __launch_bounds__(256) conv_reduce_kernel(const ConvReduceArgs<W> a) {
  const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x, per_d = a.width + 1;
  if (i >= a.dim * per_d) return;
  float s = 0.0f;
  for (int64_t g = 0; g < a.groups; ++g) s += a.part[g * a.dim * per_d + i];
  const int64_t d = i / per_d, k = i % per_d;
  if (k < a.width) {
    a.dweight[d * a.width + k] = cuda::from_math<W>(s);
  } else {
    a.dbias[d] = cuda::from_math<W>(s);
  }
}

// Decoding: a thread per (batch, channel) row; reads the state and the new inputs, writes the outputs,
// then shifts the state left by seqlen in place (each slot reads a later slot or x: no overlap hazard).
template <typename T, typename W>
__global__ void __launch_bounds__(kConvThreads) causal_conv1d_update_kernel(const ConvUpdateParams p) {
  const int64_t row = int64_t(blockIdx.x) * kConvThreads + threadIdx.x;
  if (row >= p.batch * p.dim) return;
  const int64_t b = row / p.dim, d = row % p.dim, S = p.state_len, n = p.seqlen;
  const int width = static_cast<int>(p.width), pad = width - 1;
  float w[kMaxWidth], bias;
  load_weights(static_cast<const W*>(p.weight), d * p.weight_d_stride, p.weight_w_stride, width,
               static_cast<const W*>(p.bias), d * p.bias_stride, w, bias);
  T* state = static_cast<T*>(p.conv_state) + b * p.state_batch_stride + d * p.state_d_stride;
  const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + d * p.x_d_stride;
  // buf = [state, x]: buf(j) for 0 <= j < S + n.
  auto buf = [&](int64_t j) {
    return j < S ? to_math(state[j * p.state_l_stride]) : to_math(x[(j - S) * p.x_l_stride]);
  };
  T* out = static_cast<T*>(p.out) + row * n;
  for (int64_t t = 0; t < n; ++t) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k)
      if (k < width) acc += w[k] * buf(S + t - pad + k);
    out[t] = cuda::from_math<T>(p.silu ? acc * sigmoid(acc) : acc);
  }
  for (int64_t j = 0; j < S; ++j) state[j * p.state_l_stride] = cuda::from_math<T>(buf(j + n));
}

}  // namespace conv_detail

inline int64_t conv_tiles(int64_t seqlen) { return (seqlen + kConvTile - 1) / kConvTile; }

// Floats of backward scratch that launch_conv_bwd needs.
inline int64_t conv_bwd_scratch_floats(const ConvBwdParams& p) {
  return p.batch * conv_tiles(p.seqlen) * p.dim * (p.width + 1);
}

template <typename T, typename W>
cudaError_t launch_conv_fwd(const ConvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.dim), static_cast<unsigned>(conv_tiles(p.seqlen)));
  return cuda::launch_kernel(&conv_detail::causal_conv1d_fwd_kernel<T, W>, grid, kConvThreads, 0, stream, p);
}

template <typename T, typename W>
cudaError_t launch_conv_bwd(const ConvBwdParams& p, float* scratch, cudaStream_t stream) {
  ConvBwdArgs a;
  a.p = p;
  a.part = scratch;
  a.n_tiles = conv_tiles(p.seqlen);
  const dim3 grid(static_cast<unsigned>(p.batch * p.dim), static_cast<unsigned>(a.n_tiles));
  const int smem = kConvWarps * (kMaxWidth + 1) * static_cast<int>(sizeof(float));
  FASTDL_CUDA_CHECK(cuda::launch_kernel(&conv_detail::causal_conv1d_bwd_kernel<T, W>, grid, kConvThreads, smem,
                                        stream, a));
  conv_detail::ConvReduceArgs<W> r{scratch, static_cast<W*>(p.dweight), static_cast<W*>(p.dbias), p.dim, p.width,
                                   p.batch * a.n_tiles};
  // With batch or seqlen 0 no block ran and groups is 0: the sums of nothing, zeros, are written.
  const int64_t n = p.dim * (p.width + 1);
  return cuda::launch_kernel(&conv_detail::conv_reduce_kernel<W>, dim3(static_cast<unsigned>((n + 255) / 256)), 256,
                             0, stream, r);
}

template <typename T, typename W>
cudaError_t launch_conv_update(const ConvUpdateParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim;
  const dim3 grid(static_cast<unsigned>((rows + kConvThreads - 1) / kConvThreads));
  return cuda::launch_kernel(&conv_detail::causal_conv1d_update_kernel<T, W>, grid, kConvThreads, 0, stream, p);
}

}  // namespace fastdl::causal_conv1d
