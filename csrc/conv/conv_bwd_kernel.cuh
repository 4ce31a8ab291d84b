// CUDA fused conv2d, backward: every gradient of out = act(conv(x, w) * scale + shift + bias + residual),
// with the main loop of conv_kernel.cuh (implicit_gemm_tile) under other gathers and epilogues. Torch-free;
// the fp32 workspace comes from the caller (plan_conv2d_bwd / set_conv2d_bwd_workspace, conv_launch.h).
//
// With pre = conv(x, w), z = pre * scale + shift + bias + residual and g = dout * act'(z):
//   1. pre_kernel: the forward GEMM again (x by cp.async when channels_last allows, as the forward), its
//      tile stored as fp32 into ws_pre [N*OH*OW, Cout];
//   2. stats_kernel: per channel and pixel chunk, sum g * pre and sum g (dscale, dshift = dbias), from ws_pre
//      and dout, writing dresidual = g on the way; stats_final_kernel adds the chunks up in chunk order;
//   3. dgrad_kernel: dx = implicit GEMM over (kh, kw, co) whose A gather computes g * scale from dout and
//      ws_pre on the fly (the activation's derivative fused into the GEMM prologue, nothing materialised),
//      rows = input pixels, B = the weight;
//   4. wgrad_kernel: dweight = (g * scale)^T @ im2col(x), a reduction over the N*OH*OW pixels split into
//      wgrad_splits ranges (split-K), each written to its own ws_dw slice; wgrad_reduce_kernel sums the
//      slices in split order.
// No atomics, every sum in a fixed order: the gradients are bitwise reproducible. fp16 / bf16 GEMMs run on
// tensor cores (g * scale rounded to T, as torch's low-precision backward rounds its grad_output),
// fp32 on FMAs; accumulation is fp32 throughout. Has run on the emulator (tests/ops/test_conv_emu.py),
// not on a GPU; compiled for sm_80 / sm_90.
//
// Known cost, not yet addressed: with stride s the dgrad gather visits KH*KW taps of which about 1/s^2
// hit an output pixel (zeros otherwise), and the g * scale prologue is recomputed once per tap.
#pragma once
#include "conv/conv_kernel.cuh"

namespace fastdl::conv {
namespace detail {

constexpr int kStatThreads = 256;  // 32 channels x 8 pixel lanes

// g = dout * act'(z) at (n, pixel, channel c); *pre_out = pre.
template <typename T>
struct GradAtOutput {
  const float *pre, *scale, *shift, *bias;
  const T *res, *dout;
  int64_t cout, ohw, res_sn, res_sc, res_sp, do_sn, do_sc, do_sp;
  Activation act;
  float slope;
  __device__ __forceinline__ explicit GradAtOutput(const Conv2dBwdParams& p) {
    pre = p.ws_pre, scale = static_cast<const float*>(p.scale), shift = static_cast<const float*>(p.shift);
    bias = static_cast<const float*>(p.bias), res = static_cast<const T*>(p.residual);
    dout = static_cast<const T*>(p.dout);
    cout = p.out_channels, ohw = p.out_h * p.out_w;
    res_sn = p.res_stride_n, res_sc = p.res_stride_c, res_sp = p.res_stride_p;
    do_sn = p.dout_stride_n, do_sc = p.dout_stride_c, do_sp = p.dout_stride_p;
    act = p.act, slope = p.slope;
  }
  __device__ __forceinline__ float grad(int64_t n, int64_t pix, int64_t c, float* pre_out) const {
    const float a = pre[(n * ohw + pix) * cout + c];
    float z = scale ? a * scale[c] : a;
    if (shift) z += shift[c];
    if (bias) z += bias[c];
    if (res) z += fastdl::cuda::to_math(res[n * res_sn + c * res_sc + pix * res_sp]);
    *pre_out = a;
    return fastdl::cuda::to_math(dout[n * do_sn + c * do_sc + pix * do_sp]) * activate_grad(act, z, slope);
  }
  // g * scale: the gradient of pre.
  __device__ __forceinline__ float grad_pre(int64_t n, int64_t pix, int64_t c) const {
    float a;
    const float g = grad(n, pix, c, &a);
    return scale ? g * scale[c] : g;
  }
};

// ---- 1. recompute pre ----------------------------------------------------------------------------------

struct PreEpilogue {
  float* pre;
  int64_t cout, c0;
  __device__ __forceinline__ void operator()(int64_t m, int64_t co, float v) const { pre[m * cout + c0 + co] = v; }
};

template <typename T, bool kAsyncA>
__global__ void __launch_bounds__(kThreads) conv2d_pre_kernel(const Conv2dBwdParams p) {
  const int g = static_cast<int>(blockIdx.z);
  const XByPixel<T> a(p, g);
  const WeightGather<T, true> b(p, g);
  const int64_t cout_g = p.out_channels / p.groups;
  const PreEpilogue epi{p.ws_pre, p.out_channels, g * cout_g};
  const int64_t K = p.kernel_h * p.kernel_w * (p.in_channels / p.groups);
  implicit_gemm_tile<T, kAsyncA>(a, b, epi, a.M, cout_g, static_cast<int64_t>(blockIdx.x) * kBM,
                                 static_cast<int64_t>(blockIdx.y) * kBN, 0, K);
}

// ---- 2. dscale, dshift, dresidual ----------------------------------------------------------------------

// Block (channels c0 .. c0 + 31, chunk blockIdx.y): lane = channel (ws_pre rows are channel-contiguous),
// warp w sums the chunk's pixels w, w + 8, ...; the 8 warp partials are added in warp order.
template <typename T>
__global__ void __launch_bounds__(kStatThreads) conv2d_stats_kernel(const Conv2dBwdParams p) {
  using fastdl::cuda::sld;
  using fastdl::cuda::sst;
  float* part = reinterpret_cast<float*>(fastdl::cuda::dynamic_smem());  // [2][8][32]
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, w = tid >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane, chunk = blockIdx.y;
  const int64_t P = p.batch * p.out_h * p.out_w, ohw = p.out_h * p.out_w;
  const int64_t lo = chunk * p.stat_rows, hi = lo + p.stat_rows < P ? lo + p.stat_rows : P;
  const GradAtOutput<T> go(p);
  T* dres = static_cast<T*>(p.dresidual);
  float sum_gp = 0.f, sum_g = 0.f;
  if (c < p.out_channels) {
    for (int64_t m = lo + w; m < hi; m += 8) {
      const int64_t n = m / ohw, pix = m % ohw;
      float a;
      const float g = go.grad(n, pix, c, &a);
      sum_gp = fmaf(g, a, sum_gp);
      sum_g += g;
      if (dres) dres[n * p.dres_stride_n + c * p.dres_stride_c + pix * p.dres_stride_p] = fastdl::cuda::from_math<T>(g);
    }
  }
  sst(&part[w * 32 + lane], sum_gp);
  sst(&part[256 + w * 32 + lane], sum_g);
  __syncthreads();
  if (w == 0 && c < p.out_channels) {
    float s0 = 0.f, s1 = 0.f;
    for (int i = 0; i < 8; ++i) s0 += sld(&part[i * 32 + lane]), s1 += sld(&part[256 + i * 32 + lane]);
    p.ws_stats[(chunk * 2) * p.out_channels + c] = s0;
    p.ws_stats[(chunk * 2 + 1) * p.out_channels + c] = s1;
  }
}

__global__ void __launch_bounds__(kThreads) conv2d_stats_final_kernel(const Conv2dBwdParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.out_channels) return;
  float s0 = 0.f, s1 = 0.f;
  for (int64_t i = 0; i < p.stat_chunks; ++i) {
    s0 += p.ws_stats[(i * 2) * p.out_channels + c];
    s1 += p.ws_stats[(i * 2 + 1) * p.out_channels + c];
  }
  static_cast<float*>(p.dscale)[c] = s0;
  static_cast<float*>(p.dshift)[c] = s1;
}

// ---- 3. dx ---------------------------------------------------------------------------------------------

// A of the data gradient: row = input pixel (n, ih, iw) of the group, k = (kh, kw, co), co fastest; the
// element is g * scale at the output pixel (oh, ow) that tap (kh, kw) connects to (ih, iw), if any.
template <typename T>
struct GradByInputPixel {
  GradAtOutput<T> go;
  int64_t M, hw, in_w, out_h, out_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, c0;
  int cout_g, kw;
  struct Row {
    int64_t n, th, tw;  // th = ih + pad_top, tw = iw + pad_left
    bool valid;
  };
  __device__ __forceinline__ GradByInputPixel(const Conv2dBwdParams& p, int g) : go(p) {
    hw = p.in_h * p.in_w, M = p.batch * hw, in_w = p.in_w, out_h = p.out_h, out_w = p.out_w;
    stride_h = p.stride_h, stride_w = p.stride_w, pad_top = p.pad_top, pad_left = p.pad_left;
    dil_h = p.dilation_h, dil_w = p.dilation_w;
    cout_g = static_cast<int>(p.out_channels / p.groups), kw = static_cast<int>(p.kernel_w);
    c0 = static_cast<int64_t>(g) * cout_g;
  }
  __device__ __forceinline__ Row row(int64_t m) const {
    if (m >= M) return {0, 0, 0, false};
    const int64_t pix = m % hw;
    return {m / hw, pix / in_w + pad_top, pix % in_w + pad_left, true};
  }
  __device__ __forceinline__ float load(const Row& r, int64_t k) const {
    if (!r.valid) return 0.f;
    const int kk = static_cast<int>(k);  // < KH * KW * Cout_g < 2^31 (conv_cuda.cpp checks): 32-bit div / mod
    const int co = kk % cout_g, tap = kk / cout_g;
    const int64_t h = r.th - (tap / kw) * dil_h, w = r.tw - (tap % kw) * dil_w;
    if (h < 0 || w < 0 || h % stride_h != 0 || w % stride_w != 0) return 0.f;
    const int64_t oh = h / stride_h, ow = w / stride_w;
    if (oh >= out_h || ow >= out_w) return 0.f;
    return go.grad_pre(r.n, oh * out_w + ow, c0 + co);
  }
};

template <typename T>
struct DxEpilogue {
  T* dx;  // at channel g * Cin_g
  int64_t s[4], hw, in_w;
  __device__ __forceinline__ DxEpilogue(const Conv2dBwdParams& p, int g) {
    for (int i = 0; i < 4; ++i) s[i] = p.dx_stride[i];
    dx = static_cast<T*>(p.dx) + static_cast<int64_t>(g) * (p.in_channels / p.groups) * s[1];
    hw = p.in_h * p.in_w, in_w = p.in_w;
  }
  __device__ __forceinline__ void operator()(int64_t m, int64_t ci, float v) const {
    const int64_t n = m / hw, pix = m % hw;
    dx[n * s[0] + ci * s[1] + (pix / in_w) * s[2] + (pix % in_w) * s[3]] = fastdl::cuda::from_math<T>(v);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) conv2d_dgrad_kernel(const Conv2dBwdParams p) {
  const int g = static_cast<int>(blockIdx.z);
  const GradByInputPixel<T> a(p, g);
  const WeightGather<T, false> b(p, g);
  const DxEpilogue<T> epi(p, g);
  const int64_t K = p.kernel_h * p.kernel_w * (p.out_channels / p.groups);
  implicit_gemm_tile<T>(a, b, epi, a.M, p.in_channels / p.groups, static_cast<int64_t>(blockIdx.x) * kBM,
                        static_cast<int64_t>(blockIdx.y) * kBN, 0, K);
}

// ---- 4. dweight ----------------------------------------------------------------------------------------

// A of the weight gradient: row = the group's output channel co, k = output pixel m: g * scale.
template <typename T>
struct GradByChannel {
  GradAtOutput<T> go;
  int64_t rows, c0, ohw;
  struct Row {
    int64_t c;
    bool valid;
  };
  __device__ __forceinline__ GradByChannel(const Conv2dBwdParams& p, int g) : go(p) {
    rows = p.out_channels / p.groups, c0 = static_cast<int64_t>(g) * rows, ohw = p.out_h * p.out_w;
  }
  __device__ __forceinline__ Row row(int64_t co) const { return {c0 + co, co < rows}; }
  __device__ __forceinline__ float load(const Row& r, int64_t m) const {
    return r.valid ? go.grad_pre(m / ohw, m % ohw, r.c) : 0.f;
  }
};

// B of the weight gradient: row = kf = (kh, kw, ci) (ci fastest, as the forward's k), k = output pixel m:
// x at the input pixel tap (kh, kw) of m reads, zero in the padding.
template <typename T>
struct XByTap {
  const T* x;  // at channel g * Cin_g
  int64_t s[4], rows, ohw, out_w, stride_h, stride_w, in_h, in_w;
  int cin_g, kw, dil_h, dil_w, pad_top, pad_left;
  struct Row {
    int64_t ci, dh, dw;  // ih = oh * stride_h + dh
    bool valid;
  };
  __device__ __forceinline__ XByTap(const Conv2dBwdParams& p, int g) {
    for (int i = 0; i < 4; ++i) s[i] = p.x_stride[i];
    cin_g = static_cast<int>(p.in_channels / p.groups), kw = static_cast<int>(p.kernel_w);
    x = static_cast<const T*>(p.x) + static_cast<int64_t>(g) * cin_g * s[1];
    rows = p.kernel_h * p.kernel_w * cin_g, ohw = p.out_h * p.out_w, out_w = p.out_w;
    stride_h = p.stride_h, stride_w = p.stride_w, in_h = p.in_h, in_w = p.in_w;
    dil_h = static_cast<int>(p.dilation_h), dil_w = static_cast<int>(p.dilation_w);
    pad_top = static_cast<int>(p.pad_top), pad_left = static_cast<int>(p.pad_left);
  }
  __device__ __forceinline__ Row row(int64_t kf) const {
    if (kf >= rows) return {0, 0, 0, false};
    const int tap = static_cast<int>(kf / cin_g);
    return {kf % cin_g, static_cast<int64_t>((tap / kw) * dil_h - pad_top),
            static_cast<int64_t>((tap % kw) * dil_w - pad_left), true};
  }
  __device__ __forceinline__ float load(const Row& r, int64_t m) const {
    if (!r.valid) return 0.f;
    const int64_t n = m / ohw, pix = m % ohw;
    const int64_t ih = (pix / out_w) * stride_h + r.dh, iw = (pix % out_w) * stride_w + r.dw;
    if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) return 0.f;
    return fastdl::cuda::to_math(x[n * s[0] + r.ci * s[1] + ih * s[2] + iw * s[3]]);
  }
};

struct DwPartialEpilogue {
  float* dw;  // the split's and group's [Cout_g, K] slice of ws_dw
  int64_t K;
  __device__ __forceinline__ void operator()(int64_t co, int64_t kf, float v) const { dw[co * K + kf] = v; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) conv2d_wgrad_kernel(const Conv2dBwdParams p) {
  const int g = static_cast<int>(blockIdx.z % p.groups);
  const int64_t split = blockIdx.z / p.groups;
  const GradByChannel<T> a(p, g);
  const XByTap<T> b(p, g);
  const int64_t P = p.batch * p.out_h * p.out_w, K = b.rows;
  const DwPartialEpilogue epi{p.ws_dw + (split * p.out_channels + g * a.rows) * K, K};
  const int64_t k_begin = split * p.wgrad_pixels;
  const int64_t k_end = k_begin + p.wgrad_pixels < P ? k_begin + p.wgrad_pixels : P;
  implicit_gemm_tile<T>(a, b, epi, a.rows, K, static_cast<int64_t>(blockIdx.x) * kBM,
                        static_cast<int64_t>(blockIdx.y) * kBN, k_begin, k_end);
}

// dweight [Cout, Cin_g, KH, KW] (fp32) = the splits' slices summed in split order; the slices' k is
// (kh, kw, ci), the weight's (ci, kh, kw).
__global__ void __launch_bounds__(256) conv2d_wgrad_reduce_kernel(const Conv2dBwdParams p) {
  const int64_t taps = p.kernel_h * p.kernel_w, cin_g = p.in_channels / p.groups, K = taps * cin_g;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (e >= p.out_channels * K) return;
  const int64_t c = e / K, r = e % K, kf = (r % taps) * cin_g + r / taps;
  float s = 0.f;
  for (int64_t i = 0; i < p.wgrad_splits; ++i) s += p.ws_dw[(i * p.out_channels + c) * K + kf];
  static_cast<float*>(p.dweight)[e] = s;
}

}  // namespace detail

template <typename T>
cudaError_t run_conv2d_bwd(const Conv2dBwdParams& p, cudaStream_t stream) {
  using fastdl::cuda::ceil_div;
  using fastdl::cuda::launch_kernel;
  constexpr int tile = detail::kBM, smem = detail::gemm_smem_bytes<T>();
  static_assert(detail::kBM == kConvTile && detail::kBN == kConvTile, "conv_launch.h's plan assumes this tile");
  const unsigned G = static_cast<unsigned>(p.groups);
  const int64_t P = p.batch * p.out_h * p.out_w, cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const int64_t taps = p.kernel_h * p.kernel_w;
  auto u = [](int64_t v) { return static_cast<unsigned>(v); };
  const dim3 pre_grid(u(ceil_div<int64_t>(P, tile)), u(ceil_div<int64_t>(cout_g, tile)), G);
  if (detail::x_chunks_aligned<T>(p)) {
    FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_pre_kernel<T, true>, pre_grid, detail::kThreads,
                                    detail::gemm_smem_bytes<T, true>(), stream, p));
  } else {
    FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_pre_kernel<T, false>, pre_grid, detail::kThreads, smem, stream, p));
  }
  FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_stats_kernel<T>,
                                  dim3(u(ceil_div<int64_t>(p.out_channels, 32)), u(p.stat_chunks), 1),
                                  detail::kStatThreads, 2 * detail::kStatThreads * 4, stream, p));
  FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_stats_final_kernel,
                                  dim3(u(ceil_div<int64_t>(p.out_channels, detail::kThreads)), 1, 1),
                                  detail::kThreads, 0, stream, p));
  FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_dgrad_kernel<T>,
                                  dim3(u(ceil_div<int64_t>(p.batch * p.in_h * p.in_w, tile)),
                                       u(ceil_div<int64_t>(cin_g, tile)), G),
                                  detail::kThreads, smem, stream, p));
  FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_wgrad_kernel<T>,
                                  dim3(u(ceil_div<int64_t>(cout_g, tile)), u(ceil_div<int64_t>(taps * cin_g, tile)),
                                       u(p.groups * p.wgrad_splits)),
                                  detail::kThreads, smem, stream, p));
  FASTDL_CUDA_CHECK(launch_kernel(detail::conv2d_wgrad_reduce_kernel,
                                  dim3(u(ceil_div<int64_t>(p.out_channels * taps * cin_g, 256)), 1, 1), 256, 0,
                                  stream, p));
  return cudaSuccess;
}

}  // namespace fastdl::conv
