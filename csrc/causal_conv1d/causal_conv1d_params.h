// Parameters of the depthwise causal 1D convolution (causal-conv1d's contract), for the full-sequence
// forward and backward and for the decoding update. Plain data, no torch types, shared by the CPU
// kernels and a torch-free CUDA launcher. Strides are in elements.
//
//   out[b, d, t] = act(bias[d] + sum_{k < width} weight[d, k] * x[b, d, t - (width - 1) + k]),
// with x = 0 before t = 0 and act = identity or silu.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::causal_conv1d {


// causal-conv1d's kernels take widths 2..4; the CPU kernel takes any width in this range.
constexpr int64_t kMinWidth = 2;
constexpr int64_t kMaxWidth = 8;

struct ConvParams {
  int64_t batch = 0, dim = 0, seqlen = 0, width = 0;
  bool silu = false;
  DType input_dtype = DType::kFloat32;   // x, out
  DType weight_dtype = DType::kFloat32;  // weight, bias: the input dtype or fp32

  const void* x = nullptr;       // [batch, dim, L], any strides (channel-last included)
  const void* weight = nullptr;  // [dim, width]
  const void* bias = nullptr;    // [dim], or nullptr
  int64_t x_batch_stride = 0, x_d_stride = 0, x_l_stride = 0;
  int64_t weight_d_stride = 0, weight_w_stride = 0, bias_stride = 0;

  void* out = nullptr;  // [batch, dim, L], input dtype, contiguous
};

struct ConvBwdParams : ConvParams {
  const void* dout = nullptr;  // [batch, dim, L]
  int64_t dout_batch_stride = 0, dout_d_stride = 0, dout_l_stride = 0;
  void* dx = nullptr;       // [batch, dim, L], input dtype, contiguous
  void* dweight = nullptr;  // [dim, width], weight dtype, contiguous
  void* dbias = nullptr;    // [dim], weight dtype, always computed
};

// Decoding: x holds the next seqlen (usually 1) inputs; conv_state holds the last state_len >= width - 1
// inputs and is shifted left by seqlen in place.
struct ConvUpdateParams {
  int64_t batch = 0, dim = 0, seqlen = 0, width = 0, state_len = 0;
  bool silu = false;
  DType input_dtype = DType::kFloat32;   // x, conv_state, out
  DType weight_dtype = DType::kFloat32;  // weight, bias

  const void* x = nullptr;     // [batch, dim, seqlen]
  void* conv_state = nullptr;  // [batch, dim, state_len], updated in place
  const void* weight = nullptr;
  const void* bias = nullptr;
  int64_t x_batch_stride = 0, x_d_stride = 0, x_l_stride = 0;
  int64_t state_batch_stride = 0, state_d_stride = 0, state_l_stride = 0;
  int64_t weight_d_stride = 0, weight_w_stride = 0, bias_stride = 0;

  void* out = nullptr;  // [batch, dim, seqlen], input dtype, contiguous
};

}  // namespace fastdl::causal_conv1d
