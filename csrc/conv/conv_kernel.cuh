// CUDA fused conv2d forward: implicit GEMM with the epilogue (scale, shift + bias, residual, activation)
// applied to the tile before it leaves the block. Torch-free: params struct in, raw pointers, a launch
// function taking a cudaStream_t.
//
// GEMM view per group g: rows m = output pixels (n, oh, ow) (M = N * OH * OW), columns = the group's
// output channels, reduction k = (kh, kw, ci) (K = KH * KW * Cin_g, ci fastest, so that a channels_last
// x is read along its contiguous channels). A block computes a 64 x 64 tile of (pixels x channels):
//   * A (64 x 32 per step) is gathered from x with its strides (zero outside the image: the padding)
//     and B (32 x 64) from the weight, both converted to T in shared memory;
//   * fp16 / bf16: 4 warps, each a 32 x 32 sub-tile as 2 x 2 wmma 16x16x16 fragments (mma.sync on
//     sm_80 / sm_90 tensor cores) with fp32 accumulators;
//     fp32: each of the 128 threads accumulates a 4 x 8 sub-tile with FMAs;
//   * the fp32 tile goes through shared memory to the epilogue, threads walking channels fastest, so
//     an NHWC output (channels_last) is written coalesced.
// This is the straightforward version: no cp.async double buffering nor swizzled shared memory yet;
// it has been compiled for sm_80 / sm_90 but has not run on a GPU (none was available).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "conv/conv_launch.h"
#include "conv/conv_params.h"

namespace fastdl::conv {
namespace detail {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kPad = 8;  // shared-memory row padding (elements): wmma's ldm must be a multiple of 8

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float activate(Activation a, float z, float slope) {
  switch (a) {
    case Activation::kRelu: return fmaxf(z, 0.f);
    case Activation::kLeakyRelu: return z > 0.f ? z : z * slope;
    case Activation::kSilu: return z / (1.f + __expf(-z));
    case Activation::kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case Activation::kSigmoid: return 1.f / (1.f + __expf(-z));
    case Activation::kTanh: return tanhf(z);
    default: return z;
  }
}

template <typename T>
struct Smem {
  T a[kBM][kBK + kPad];  // pixels x k
  T b[kBK][kBN + kPad];  // k x channels
  float c[kBM][kBN + 4];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) conv2d_fwd_kernel(const Conv2dParams p) {
  __shared__ __align__(32) Smem<T> sm;
  const int tid = threadIdx.x;
  const int64_t ohw = p.out_h * p.out_w, M = p.batch * ohw;
  const int cin_g = static_cast<int>(p.in_channels / p.groups), cout_g = static_cast<int>(p.out_channels / p.groups);
  const int KW = static_cast<int>(p.kernel_w), taps = static_cast<int>(p.kernel_h * p.kernel_w);
  const int K = taps * cin_g;
  const int g = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);

  // A loader: thread owns tile row ar (one output pixel) and 16 consecutive k from ak.
  const int ar = tid >> 1, ak = (tid & 1) * 16;
  const int64_t am = m0 + ar;
  const bool a_valid = am < M;
  int64_t a_n = 0, a_ih0 = 0, a_iw0 = 0;
  if (a_valid) {
    a_n = am / ohw;
    const int64_t pix = am % ohw;
    a_ih0 = (pix / p.out_w) * p.stride_h - p.pad_top;
    a_iw0 = (pix % p.out_w) * p.stride_w - p.pad_left;
  }
  const T* xn = x + a_n * p.x_stride[0] + static_cast<int64_t>(g) * cin_g * p.x_stride[1];
  // B loader: thread owns k row bk and 16 consecutive channels from bc.
  const int bk = tid >> 2, bc = (tid & 3) * 16;

  // fp32 path: thread's 4 x 8 sub-tile.
  float acc[4][8];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  using FragT = std::conditional_t<kTensorCores, T, __half>;  // unused type for fp32
  const int warp = tid >> 5, wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> cfrag[2][2];
  if constexpr (kTensorCores) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(cfrag[i][j], 0.f);
  }

  for (int k0 = 0; k0 < K; k0 += kBK) {
    for (int e = 0; e < 16; ++e) {
      const int k = k0 + ak + e;
      float v = 0.f;
      if (a_valid && k < K) {
        const int ci = k % cin_g, tap = k / cin_g, kh = tap / KW, kw = tap % KW;
        const int64_t ih = a_ih0 + kh * p.dilation_h, iw = a_iw0 + kw * p.dilation_w;
        if (ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w) {
          v = to_float(xn[ci * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]]);
        }
      }
      sm.a[ar][ak + e] = from_float<T>(v);
    }
    {
      const int k = k0 + bk;
      int ci = 0, tap = 0;
      if (k < K) ci = k % cin_g, tap = k / cin_g;
      for (int e = 0; e < 16; ++e) {
        const int co = n0 + bc + e;
        float v = 0.f;
        if (k < K && co < cout_g) {
          // weight [Cout, Cin_g, KH, KW], contiguous
          v = to_float(w[(static_cast<int64_t>(g) * cout_g + co) * K + ci * taps + tap]);
        }
        sm.b[bk][bc + e] = from_float<T>(v);
      }
    }
    __syncthreads();
    if constexpr (kTensorCores) {
      for (int kk = 0; kk < kBK; kk += 16) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, FragT, nvcuda::wmma::row_major> afrag[2];
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, FragT, nvcuda::wmma::row_major> bfrag[2];
        for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(afrag[i], &sm.a[wm + 16 * i][kk], kBK + kPad);
        for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(bfrag[j], &sm.b[kk][wn + 16 * j], kBN + kPad);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(cfrag[i][j], afrag[i], bfrag[j], cfrag[i][j]);
      }
    } else {
      const int ty = tid >> 3, tx = tid & 7;  // rows ty*4 .. +4, channels tx*8 .. +8
      for (int kk = 0; kk < kBK; ++kk) {
        float a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = to_float(sm.a[ty * 4 + i][kk]);
        for (int j = 0; j < 8; ++j) b[j] = to_float(sm.b[kk][tx * 8 + j]);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  if constexpr (kTensorCores) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&sm.c[wm + 16 * i][wn + 16 * j], cfrag[i][j], kBN + 4,
                                        nvcuda::wmma::mem_row_major);
  } else {
    const int ty = tid >> 3, tx = tid & 7;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) sm.c[ty * 4 + i][tx * 8 + j] = acc[i][j];
  }
  __syncthreads();

  // Epilogue: channels fastest across threads.
  const float* scale = static_cast<const float*>(p.scale);
  const float* shift = static_cast<const float*>(p.shift);
  const float* bias = static_cast<const float*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN, col = idx % kBN;
    const int64_t m = m0 + r;
    const int co = n0 + col;
    if (m >= M || co >= cout_g) continue;
    const int64_t n = m / ohw, pix = m % ohw;
    const int64_t c = static_cast<int64_t>(g) * cout_g + co;
    float z = sm.c[r][col];
    if (scale) z *= scale[c];
    if (shift) z += shift[c];
    if (bias) z += bias[c];
    if (res) z += to_float(res[n * p.res_stride_n + c * p.res_stride_c + pix * p.res_stride_p]);
    out[n * p.out_stride_n + c * p.out_stride_c + pix * p.out_stride_p] = from_float<T>(activate(p.act, z, p.slope));
  }
}

}  // namespace detail

template <typename T>
cudaError_t run_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream) {
  const int64_t M = p.batch * p.out_h * p.out_w, cout_g = p.out_channels / p.groups;
  const dim3 grid(static_cast<unsigned>((M + detail::kBM - 1) / detail::kBM),
                  static_cast<unsigned>((cout_g + detail::kBN - 1) / detail::kBN), static_cast<unsigned>(p.groups));
  detail::conv2d_fwd_kernel<T><<<grid, detail::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fastdl::conv
