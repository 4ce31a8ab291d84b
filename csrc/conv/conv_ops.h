// Torch-facing bodies of the fused conv2d ops, shared by the CPU and CUDA registrations: check the
// arguments (messages name the argument, what was expected and what came), allocate outputs, fill the
// params. The output takes x's memory format: channels_last when x is channels_last (and not also
// NCHW-contiguous, as 1x1 images are), NCHW otherwise, as torch's own conv does.
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/check.h"
#include "conv/conv_params.h"

namespace fastdl::conv {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline Activation parse_activation(const std::string& a) {
  if (a == "none") return Activation::kNone;
  if (a == "relu") return Activation::kRelu;
  if (a == "leaky_relu") return Activation::kLeakyRelu;
  if (a == "silu") return Activation::kSilu;
  if (a == "gelu") return Activation::kGelu;
  if (a == "sigmoid") return Activation::kSigmoid;
  if (a == "tanh") return Activation::kTanh;
  TORCH_CHECK(false, "conv2d_fused: activation must be one of none, relu, leaky_relu, silu, gelu, sigmoid, tanh; got '",
              a, "'");
}

inline bool channels_last_out(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Stride between consecutive output pixels p = oh * OW + ow of t [N, C, OH, OW], or -1 when h and w do
// not nest (then the caller copies t to a layout where they do).
inline int64_t pixel_stride(const Tensor& t) {
  const int64_t OH = t.size(2), OW = t.size(3);
  if (OW == 1) return t.stride(2);
  if (OH == 1 || t.stride(2) == OW * t.stride(3)) return t.stride(3);
  return -1;
}

// Geometry shared by forward and backward; padding is (top, bottom, left, right).
struct Geometry {
  int64_t out_h = 0, out_w = 0;
};

inline Geometry check_conv_args(const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                int64_t groups, const OptTensor& scale, const OptTensor& shift,
                                const OptTensor& residual) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (N, C_in, H, W), got ", shape_str(x.sizes()));
  TORCH_CHECK(weight.dim() == 4, op, ": weight must have shape (C_out, C_in / groups, kH, kW), got ",
              shape_str(weight.sizes()));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
  TORCH_CHECK(weight.scalar_type() == t, op, ": weight must have the dtype of x (", t, "), got ",
              weight.scalar_type());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op, ": stride must be 2 positive ints, got ",
              stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
              ": dilation must be 2 positive ints, got ", dilation);
  TORCH_CHECK(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0, op,
              ": padding must be 4 non-negative ints (top, bottom, left, right), got ", padding);
  const int64_t cin = x.size(1), cout = weight.size(0);
  TORCH_CHECK(groups >= 1, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(cin % groups == 0, op, ": groups (", groups, ") must divide the input channels (", cin, ")");
  TORCH_CHECK(cout % groups == 0, op, ": groups (", groups, ") must divide the output channels (weight.shape[0] = ",
              cout, ")");
  TORCH_CHECK(weight.size(1) * groups == cin, op, ": channel mismatch: x has ", cin,
              " channels, so weight.shape[1] must be C_in / groups = ", cin / groups, ", got weight of shape ",
              shape_str(weight.sizes()));
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t eff_kh = dilation[0] * (kh - 1) + 1, eff_kw = dilation[1] * (kw - 1) + 1;
  const int64_t ph = x.size(2) + padding[0] + padding[1], pw = x.size(3) + padding[2] + padding[3];
  TORCH_CHECK(kh >= 1 && kw >= 1 && eff_kh <= ph && eff_kw <= pw, op, ": the (dilated) kernel ", eff_kh, "x", eff_kw,
              " is larger than the padded input ", ph, "x", pw);
  Geometry geo;
  geo.out_h = (ph - eff_kh) / stride[0] + 1;
  geo.out_w = (pw - eff_kw) / stride[1] + 1;
  const std::pair<const char*, const OptTensor*> params[] = {{"bias", &bias}, {"scale", &scale}, {"shift", &shift}};
  for (const auto& [name, v] : params) {
    if (!*v) continue;
    const Tensor& u = **v;
    TORCH_CHECK(u.device() == x.device(), op, ": ", name, " is on ", u.device(), " but x is on ", x.device(),
                "; all tensors must be on one device");
    TORCH_CHECK(u.dim() == 1 && u.size(0) == cout, op, ": ", name, " must have shape (C_out,) = (", cout, ",), got ",
                shape_str(u.sizes()));
    TORCH_CHECK(u.scalar_type() == t || u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, op, ": ",
                name, " must have the dtype of x (", t, ") or float32, got ", u.scalar_type());
  }
  if (residual) {
    TORCH_CHECK(residual->device() == x.device(), op, ": residual is on ", residual->device(), " but x is on ",
                x.device(), "; all tensors must be on one device");
    const std::vector<int64_t> want = {x.size(0), cout, geo.out_h, geo.out_w};
    TORCH_CHECK(residual->sizes() == c10::IntArrayRef(want), op, ": residual must have the output's shape ",
                shape_str(want), ", got ", shape_str(residual->sizes()));
    TORCH_CHECK(residual->scalar_type() == t, op, ": residual must have the dtype of x (", t, "), got ",
                residual->scalar_type());
  }
  return geo;
}

inline Tensor math_param(const OptTensor& v, at::ScalarType mt) {
  return v ? v->to(mt).contiguous() : Tensor();
}

// A tensor of the output's shape whose pixel order nests (see pixel_stride), in out's memory format if
// it has to be copied.
inline Tensor pixel_ordered(const Tensor& t, bool channels_last) {
  if (pixel_stride(t) >= 0) return t;
  return t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// Fills p from checked arguments; the math-dtype bias/scale/shift copies must outlive the launch.
inline void set_conv_params(Conv2dParams& p, const Tensor& x, const Tensor& weight, const Tensor& bias_m,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            int64_t groups, const Tensor& scale_m, const Tensor& shift_m, const Tensor& residual,
                            const std::string& activation, double slope, const Geometry& geo) {
  p.batch = x.size(0), p.in_channels = x.size(1), p.in_h = x.size(2), p.in_w = x.size(3);
  p.out_channels = weight.size(0), p.out_h = geo.out_h, p.out_w = geo.out_w;
  p.kernel_h = weight.size(2), p.kernel_w = weight.size(3), p.groups = groups;
  p.stride_h = stride[0], p.stride_w = stride[1], p.dilation_h = dilation[0], p.dilation_w = dilation[1];
  p.pad_top = padding[0], p.pad_left = padding[2];
  p.act = parse_activation(activation), p.slope = static_cast<float>(slope);
  p.input_dtype = to_dtype(x.scalar_type(), "conv2d_fused", "x");
  p.x = x.data_ptr();
  for (int i = 0; i < 4; ++i) p.x_stride[i] = x.stride(i);
  p.weight = weight.data_ptr();
  p.bias = bias_m.defined() ? bias_m.data_ptr() : nullptr;
  p.scale = scale_m.defined() ? scale_m.data_ptr() : nullptr;
  p.shift = shift_m.defined() ? shift_m.data_ptr() : nullptr;
  if (residual.defined()) {
    p.residual = residual.data_ptr();
    p.res_stride_n = residual.stride(0), p.res_stride_c = residual.stride(1), p.res_stride_p = pixel_stride(residual);
  }
}

inline Tensor empty_output(const Tensor& x, int64_t cout, const Geometry& geo) {
  return at::empty({x.size(0), cout, geo.out_h, geo.out_w},
                   x.options().memory_format(channels_last_out(x) ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous));
}

using ConvFwdFn = void (*)(const Conv2dParams&);
using ConvBwdFn = void (*)(const Conv2dBwdParams&);

// ---- op bodies, one per schema in csrc/ops.cpp ----

template <ConvFwdFn Launch>
Tensor conv2d_fused(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
                    const OptTensor& shift, c10::string_view activation, double slope, const OptTensor& residual,
                    const OptTensor& packed_weight = std::nullopt) {
  const char* op = "conv2d_fused";
  const Geometry geo = check_conv_args(op, x, weight, bias, stride, padding, dilation, groups, scale, shift, residual);
  if (packed_weight) {
    TORCH_CHECK(packed_weight->device() == x.device(), op, ": packed_weight is on ", packed_weight->device(),
                " but x is on ", x.device(), "; all tensors must be on one device");
    TORCH_CHECK(packed_weight->scalar_type() == at::kFloat && packed_weight->dim() == 1 &&
                    packed_weight->is_contiguous(),
                op, ": packed_weight must be a contiguous 1-D float32 tensor from conv2d_pack_weight, got ",
                packed_weight->scalar_type(), " of shape ", shape_str(packed_weight->sizes()));
  }
  const auto mt = math_dtype(x.scalar_type());
  const bool cl = channels_last_out(x);
  Tensor out = empty_output(x, weight.size(0), geo);
  const Tensor w = weight.contiguous(), bias_m = math_param(bias, mt), scale_m = math_param(scale, mt),
               shift_m = math_param(shift, mt);
  const Tensor res = residual ? pixel_ordered(*residual, cl) : Tensor();
  Conv2dParams p;
  set_conv_params(p, x, w, bias_m, stride, padding, dilation, groups, scale_m, shift_m, res, std::string(activation),
                  slope, geo);
  p.out = out.data_ptr();
  p.out_stride_n = out.stride(0), p.out_stride_c = out.stride(1), p.out_stride_p = pixel_stride(out);
  if (packed_weight && packed_weight->numel() > 0) {
    p.packed_weight = packed_weight->data_ptr<float>(), p.packed_weight_numel = packed_weight->numel();
  }
  if (out.numel() > 0) Launch(p);
  return out;
}

template <ConvBwdFn Launch>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv2d_fused_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
    const OptTensor& shift, c10::string_view activation, double slope, const OptTensor& residual) {
  const char* op = "conv2d_fused_backward";
  const Geometry geo = check_conv_args(op, x, weight, bias, stride, padding, dilation, groups, scale, shift, residual);
  const int64_t cout = weight.size(0);
  const std::vector<int64_t> out_shape = {x.size(0), cout, geo.out_h, geo.out_w};
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ",
              x.device());
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(out_shape), op, ": grad_out must have the output's shape ",
              shape_str(out_shape), ", got ", shape_str(grad_out.sizes()));
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (",
              x.scalar_type(), "), got ", grad_out.scalar_type());
  const auto mt = math_dtype(x.scalar_type());
  const bool cl = channels_last_out(x);
  const Tensor w = weight.contiguous(), bias_m = math_param(bias, mt), scale_m = math_param(scale, mt),
               shift_m = math_param(shift, mt);
  const Tensor res = residual ? pixel_ordered(*residual, cl) : Tensor();
  const Tensor dout = pixel_ordered(grad_out, cl);
  Conv2dBwdParams p;
  set_conv_params(p, x, w, bias_m, stride, padding, dilation, groups, scale_m, shift_m, res, std::string(activation),
                  slope, geo);
  p.dout = dout.data_ptr();
  p.dout_stride_n = dout.stride(0), p.dout_stride_c = dout.stride(1), p.dout_stride_p = pixel_stride(dout);
  Tensor dx = at::empty_like(x);
  for (int i = 0; i < 4; ++i) p.dx_stride[i] = dx.stride(i);
  p.dx = dx.data_ptr();
  Tensor dres;
  if (residual) {
    dres = empty_output(x, cout, geo);
    p.dresidual = dres.data_ptr();
    p.dres_stride_n = dres.stride(0), p.dres_stride_c = dres.stride(1), p.dres_stride_p = pixel_stride(dres);
  }
  Tensor dweight = at::empty(weight.sizes(), x.options().dtype(mt));
  Tensor dscale = at::empty({cout}, x.options().dtype(mt)), dshift = at::empty({cout}, x.options().dtype(mt));
  p.dweight = dweight.data_ptr(), p.dscale = dscale.data_ptr(), p.dshift = dshift.data_ptr();
  if (x.numel() > 0 || dweight.numel() > 0) Launch(p);
  const Tensor empty = at::empty({0}, x.options());
  return {dx,
          dweight.to(weight.scalar_type()),
          bias ? dshift.to(bias->scalar_type(), /*non_blocking=*/false, /*copy=*/true) : empty,  // not aliasing dshift
          scale ? dscale.to(scale->scalar_type()) : empty,
          shift ? dshift.to(shift->scalar_type()) : empty,
          residual ? dres : empty};
}

}  // namespace fastdl::conv
