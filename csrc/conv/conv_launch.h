// Entry points of the CUDA fused-conv2d kernels, free of torch and of kernel code: the binding
// (conv_cuda.cpp) calls launch_conv2d_fwd / launch_conv2d_bwd (conv_launch.cu), which pick the
// instantiation of run_conv2d_fwd (conv_fwd_{fp16,bf16,fp32}.cu) or run_conv2d_bwd
// (conv_bwd_{fp16,bf16,fp32}.cu) for the input dtype. They run asynchronously on `stream` and return the
// launch error. bias / scale / shift are fp32 (the math dtype); fp64 is CPU-only.
//
// The backward needs an fp32 workspace that the caller allocates: plan_conv2d_bwd gives its size from the
// shapes, set_conv2d_bwd_workspace points the params into it.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "conv/conv_params.h"

namespace fastdl::conv {

cudaError_t launch_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream);
cudaError_t launch_conv2d_bwd(const Conv2dBwdParams& p, cudaStream_t stream);

template <typename T>
cudaError_t run_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream);
template <typename T>
cudaError_t run_conv2d_bwd(const Conv2dBwdParams& p, cudaStream_t stream);

// GEMM tile of every conv kernel (conv_kernel.cuh: 64 output rows x 64 columns per block).
constexpr int64_t kConvTile = 64;
// The dscale / dshift reduction: chunks of at least this many pixels, at most kMaxStatChunks chunks.
constexpr int64_t kStatMinRows = 1024, kMaxStatChunks = 1024;
// dweight's split-K: aim for this many blocks (about two waves of an H100's 132 SMs), each split at
// least kWgradMinPixels pixels, at most kMaxWgradSplits splits.
constexpr int64_t kWgradTargetBlocks = 264, kWgradMinPixels = 1024, kMaxWgradSplits = 64;

struct Conv2dBwdPlan {
  int64_t stat_chunks = 0, stat_rows = 0, wgrad_splits = 1, wgrad_pixels = 0;
  int64_t pre_floats = 0, stat_floats = 0, dw_floats = 0;
  int64_t total_floats() const { return pre_floats + stat_floats + dw_floats; }
};

// From the shapes only, so that the reduction order (and so the result) is the same on every run.
inline Conv2dBwdPlan plan_conv2d_bwd(const Conv2dParams& p) {
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  Conv2dBwdPlan plan;
  const int64_t P = p.batch * p.out_h * p.out_w, C = p.out_channels;
  const int64_t K = p.kernel_h * p.kernel_w * (p.in_channels / p.groups);
  plan.stat_chunks = std::min(cdiv(P, kStatMinRows), kMaxStatChunks);
  plan.stat_rows = plan.stat_chunks > 0 ? cdiv(P, plan.stat_chunks) : 0;
  const int64_t tiles = cdiv(C / p.groups, kConvTile) * cdiv(K, kConvTile) * p.groups;
  int64_t splits = std::min({cdiv(kWgradTargetBlocks, tiles), cdiv(P, kWgradMinPixels), kMaxWgradSplits,
                             std::max<int64_t>(65535 / p.groups, 1)});
  splits = std::max<int64_t>(splits, 1);
  plan.wgrad_pixels = cdiv(cdiv(P, splits), 32) * 32;  // whole k steps of the main loop per split
  plan.wgrad_splits = plan.wgrad_pixels > 0 ? std::max<int64_t>(cdiv(P, plan.wgrad_pixels), 1) : 1;
  plan.pre_floats = P * C;
  plan.stat_floats = plan.stat_chunks * 2 * C;
  plan.dw_floats = plan.wgrad_splits * C * K;
  return plan;
}

// ws: plan.total_floats() floats of device memory, alive until the kernels are done.
inline void set_conv2d_bwd_workspace(Conv2dBwdParams& p, const Conv2dBwdPlan& plan, float* ws) {
  p.ws_pre = ws;
  p.ws_stats = ws + plan.pre_floats;
  p.ws_dw = ws + plan.pre_floats + plan.stat_floats;
  p.stat_chunks = plan.stat_chunks, p.stat_rows = plan.stat_rows;
  p.wgrad_splits = plan.wgrad_splits, p.wgrad_pixels = plan.wgrad_pixels;
}

}  // namespace fastdl::conv
