// Torch-facing bodies of the causal conv1d ops, shared by the CPU and CUDA registrations: check the
// arguments, allocate outputs, fill the params.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "causal_conv1d/causal_conv1d_params.h"
#include "common/check.h"

namespace fastdl::causal_conv1d {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// x: (batch, dim, L); weight (dim, width) in x's dtype or fp32; bias (dim,) in weight's dtype.
inline void check_conv_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (batch, dim, seqlen), got ", shape_str(x.sizes()));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
  const int64_t dim = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim, op, ": weight must have shape (dim, width) = (", dim,
              ", width), got ", shape_str(weight.sizes()));
  const int64_t width = weight.size(1);
  TORCH_CHECK(width >= kMinWidth && width <= kMaxWidth, op, ": width (weight.shape[1]) must be in [", kMinWidth,
              ", ", kMaxWidth, "], got ", width);
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == t || (wt == at::kFloat && t != at::kDouble), op, ": weight must have the dtype of x (", t, ")",
              t == at::kDouble ? "" : " or float32", ", got ", wt);
  if (bias) {
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device(),
                "; all tensors must be on one device");
    TORCH_CHECK(bias->sizes() == c10::IntArrayRef({dim}), op, ": bias must have shape ", shape_str({dim}),
                " (dim,), got ", shape_str(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == wt, op, ": bias must have the dtype of weight (", wt, "), got ",
                bias->scalar_type());
  }
}

inline void set_conv_params(ConvParams& p, const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                            bool silu) {
  p.batch = x.size(0), p.dim = x.size(1), p.seqlen = x.size(2), p.width = weight.size(1);
  p.silu = silu;
  p.input_dtype = to_dtype(x.scalar_type(), op, "x"), p.weight_dtype = to_dtype(weight.scalar_type(), op, "weight");
  p.x = x.data_ptr(), p.x_batch_stride = x.stride(0), p.x_d_stride = x.stride(1), p.x_l_stride = x.stride(2);
  p.weight = weight.data_ptr(), p.weight_d_stride = weight.stride(0), p.weight_w_stride = weight.stride(1);
  if (bias) p.bias = bias->data_ptr(), p.bias_stride = bias->stride(0);
}

using ConvFwdFn = void (*)(const ConvParams&);
using ConvBwdFn = void (*)(const ConvBwdParams&);
using ConvUpdateFn = void (*)(const ConvUpdateParams&);

// ---- op bodies, one per schema in csrc/ops.cpp ----

template <ConvFwdFn Launch>
Tensor causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias, bool silu) {
  const char* op = "causal_conv1d_fwd";
  check_conv_args(op, x, weight, bias);
  ConvParams p;
  set_conv_params(p, op, x, weight, bias, silu);
  Tensor out = at::empty({p.batch, p.dim, p.seqlen}, x.options());
  p.out = out.data_ptr();
  Launch(p);
  return out;
}

template <ConvBwdFn Launch>
std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                     const Tensor& dout, bool silu) {
  const char* op = "causal_conv1d_bwd";
  check_conv_args(op, x, weight, bias);
  TORCH_CHECK(dout.device() == x.device(), op, ": dout is on ", dout.device(), " but x is on ", x.device());
  TORCH_CHECK(dout.sizes() == x.sizes(), op, ": dout must have shape ", shape_str(x.sizes()), " (that of x), got ",
              shape_str(dout.sizes()));
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), op, ": dout must have the dtype of x (", x.scalar_type(),
              "), got ", dout.scalar_type());
  ConvBwdParams p;
  set_conv_params(p, op, x, weight, bias, silu);
  p.dout = dout.data_ptr();
  p.dout_batch_stride = dout.stride(0), p.dout_d_stride = dout.stride(1), p.dout_l_stride = dout.stride(2);
  Tensor dx = at::empty({p.batch, p.dim, p.seqlen}, x.options());
  Tensor dweight = at::empty({p.dim, p.width}, weight.options());
  Tensor dbias = at::empty({p.dim}, weight.options());
  p.dx = dx.data_ptr(), p.dweight = dweight.data_ptr(), p.dbias = dbias.data_ptr();
  Launch(p);
  return {dx, dweight, dbias};
}

template <ConvUpdateFn Launch>
Tensor causal_conv1d_update(const Tensor& x, const Tensor& conv_state, const Tensor& weight, const OptTensor& bias,
                            bool silu) {
  const char* op = "causal_conv1d_update";
  check_conv_args(op, x, weight, bias);
  const int64_t batch = x.size(0), dim = x.size(1), width = weight.size(1);
  TORCH_CHECK(conv_state.device() == x.device(), op, ": conv_state is on ", conv_state.device(), " but x is on ",
              x.device());
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(0) == batch && conv_state.size(1) == dim &&
                  conv_state.size(2) >= width - 1,
              op, ": conv_state must have shape (batch, dim, state_len) = (", batch, ", ", dim,
              ", state_len) with state_len >= width - 1 = ", width - 1, ", got ", shape_str(conv_state.sizes()));
  TORCH_CHECK(conv_state.scalar_type() == x.scalar_type(), op, ": conv_state must have the dtype of x (",
              x.scalar_type(), "), got ", conv_state.scalar_type());
  ConvUpdateParams p;
  p.batch = batch, p.dim = dim, p.seqlen = x.size(2), p.width = width, p.state_len = conv_state.size(2);
  p.silu = silu;
  p.input_dtype = to_dtype(x.scalar_type(), op, "x"), p.weight_dtype = to_dtype(weight.scalar_type(), op, "weight");
  p.x = x.data_ptr(), p.x_batch_stride = x.stride(0), p.x_d_stride = x.stride(1), p.x_l_stride = x.stride(2);
  p.conv_state = conv_state.data_ptr();
  p.state_batch_stride = conv_state.stride(0), p.state_d_stride = conv_state.stride(1);
  p.state_l_stride = conv_state.stride(2);
  p.weight = weight.data_ptr(), p.weight_d_stride = weight.stride(0), p.weight_w_stride = weight.stride(1);
  if (bias) p.bias = bias->data_ptr(), p.bias_stride = bias->stride(0);
  Tensor out = at::empty({batch, dim, p.seqlen}, x.options());
  p.out = out.data_ptr();
  Launch(p);
  return out;
}

// Registers the causal conv1d ops for one dispatch key (CPU or CUDA) with that backend's launchers.
#define FASTDL_REGISTER_CAUSAL_CONV1D_IMPLS(m, FWD, BWD, UPDATE)                       \
  m.impl("causal_conv1d_fwd", &fastdl::causal_conv1d::causal_conv1d_fwd<FWD>);         \
  m.impl("causal_conv1d_bwd", &fastdl::causal_conv1d::causal_conv1d_bwd<BWD>);         \
  m.impl("causal_conv1d_update", &fastdl::causal_conv1d::causal_conv1d_update<UPDATE>)

}  // namespace fastdl::causal_conv1d
