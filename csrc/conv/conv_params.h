// Parameters of the fused 2D convolution (fastdl::conv2d_fused). Plain data, no torch types: shared by
// the CPU kernel and the torch-free CUDA launcher. Strides are in elements, ordered (n, c, h, w) whatever
// the memory format, so NCHW and channels_last take the same code.
//
//   pre[n, co, oh, ow] = sum_{ci, kh, kw} x[n, g*Cin_g + ci, oh*sh - pad_top + kh*dh, ow*sw - pad_left + kw*dw]
//                                          * weight[co, ci, kh, kw]          (g = co / Cout_g; zero outside x)
//   out = act(pre * scale[co] + shift[co] + bias[co] + residual[n, co, oh, ow])
//
// with every one of scale, shift, bias, residual optional (scale = 1, the others 0 when absent).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::conv {

// The epilogue's activation; kLeakyRelu reads `slope`.
enum class Activation : int { kNone = 0, kRelu, kLeakyRelu, kSilu, kGelu, kSigmoid, kTanh };

struct Conv2dParams {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, out_h = 0, out_w = 0;
  int64_t kernel_h = 0, kernel_w = 0, groups = 1;
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  int64_t pad_top = 0, pad_left = 0;  // bottom / right padding are implied by out_h / out_w
  Activation act = Activation::kNone;
  float slope = 0.01f;  // leaky_relu's negative slope

  DType input_dtype = DType::kFloat32;  // x, weight, residual, out; bias/scale/shift are in the math dtype

  const void* x = nullptr;  // [N, Cin, H, W], any strides
  int64_t x_stride[4] = {0, 0, 0, 0};
  const void* weight = nullptr;  // [Cout, Cin / groups, KH, KW], contiguous
  const void* bias = nullptr;    // [Cout] contiguous, math dtype, or nullptr (likewise scale, shift)
  const void* scale = nullptr;
  const void* shift = nullptr;
  // residual and out share one pixel order: element (n, c, p = oh * OW + ow) sits at n*sn + c*sc + p*sp.
  const void* residual = nullptr;  // [N, Cout, OH, OW], or nullptr
  int64_t res_stride_n = 0, res_stride_c = 0, res_stride_p = 0;
  void* out = nullptr;  // [N, Cout, OH, OW]
  int64_t out_stride_n = 0, out_stride_c = 0, out_stride_p = 0;
  // CPU only: the weight already in the fp32 forward's panel layout (fastdl::conv2d_pack_weight), or nullptr
  // (the kernel then packs it per call where it needs it).
  const float* packed_weight = nullptr;
  int64_t packed_weight_numel = 0;
};

// Backward. The CPU kernel makes one pass over output tiles (conv_cpu.cpp); the CUDA one runs a few
// kernels (conv_bwd_kernel.cuh) through the fp32 workspace at the end of this struct.
struct Conv2dBwdParams : Conv2dParams {
  const void* dout = nullptr;  // [N, Cout, OH, OW], pixel order as out
  int64_t dout_stride_n = 0, dout_stride_c = 0, dout_stride_p = 0;
  void* dx = nullptr;  // [N, Cin, H, W], input dtype, strides dx_stride
  int64_t dx_stride[4] = {0, 0, 0, 0};
  void* dresidual = nullptr;  // [N, Cout, OH, OW] input dtype, pixel order as out; nullptr without residual
  int64_t dres_stride_n = 0, dres_stride_c = 0, dres_stride_p = 0;
  // Math-dtype (fp32, fp64 for fp64 inputs) contiguous accumulators, written whole.
  void* dweight = nullptr;  // [Cout, Cin / groups, KH, KW]
  void* dscale = nullptr;   // [Cout]: sum over (n, p) of g * pre
  void* dshift = nullptr;   // [Cout]: sum over (n, p) of g; also dbias
  // CUDA only: fp32 workspace, laid out by set_conv2d_bwd_workspace (conv_launch.h); unused on the CPU.
  float* ws_pre = nullptr;    // [N * OH * OW, Cout]: the recomputed conv (before scale)
  float* ws_stats = nullptr;  // [stat_chunks, 2, Cout]: per-chunk sums of g * pre and of g
  float* ws_dw = nullptr;     // [wgrad_splits, Cout, KH * KW * Cin_g]: per-split dweight, k = (kh, kw, ci)
  int64_t stat_chunks = 0, stat_rows = 0;      // pixel chunks of the dscale / dshift reduction, rows per chunk
  int64_t wgrad_splits = 0, wgrad_pixels = 0;  // split-K of the dweight GEMM, pixels per split
};

}  // namespace fastdl::conv
