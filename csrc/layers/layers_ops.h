// Torch-facing bodies of the fused layer ops (rms_norm, rotary_emb, swiglu), shared by the CPU and CUDA
// registrations: check the arguments, view the inputs as rows without copying where the strides allow,
// allocate outputs and workspaces, fill the params, call the backend's launcher.
#pragma once
#include <torch/types.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "layers/layers_params.h"

namespace fastdl::layers {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline void check_same(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              shape_str(ref.sizes()), ", got ", shape_str(t.sizes()));
}

// t as (rows, cols) with a contiguous last dim: a view when the leading dims collapse (e.g. a slice of a
// fused projection's output), else a copy.
inline Tensor as_rows(const Tensor& t, int64_t cols) {
  Tensor rows = t.reshape({-1, cols});
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

inline int64_t row_stride(const Tensor& rows) { return rows.size(0) > 1 ? rows.stride(0) : rows.size(1); }

// ---- rms_norm ---------------------------------------------------------------------------------------

using RMSNormFwdFn = void (*)(const RMSNormParams&);
using RMSNormBwdFn = void (*)(const RMSNormBwdParams&);

// Checks x (..., *normalized_shape) and weight (normalized_shape) and returns the number of normalized
// elements per row.
inline int64_t check_rms_norm_args(const char* op, const Tensor& x, c10::IntArrayRef normalized_shape,
                                   const OptTensor& weight) {
  to_dtype(x.scalar_type(), op, "x");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(nd >= 1, op, ": normalized_shape must have at least one dimension, got ", shape_str(normalized_shape));
  TORCH_CHECK(x.dim() >= nd && x.sizes().slice(x.dim() - nd) == normalized_shape, op,
              ": x's trailing dimensions must equal normalized_shape ", shape_str(normalized_shape), ", got x of shape ",
              shape_str(x.sizes()));
  if (weight) {
    TORCH_CHECK(weight->device() == x.device(), op, ": weight is on ", weight->device(), " but x is on ", x.device(),
                "; all tensors must be on one device");
    TORCH_CHECK(weight->scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (", x.scalar_type(),
                "), got ", weight->scalar_type());
    TORCH_CHECK(weight->sizes() == normalized_shape, op, ": weight must have shape normalized_shape ",
                shape_str(normalized_shape), ", got ", shape_str(weight->sizes()));
  }
  int64_t cols = 1;
  for (int64_t s : normalized_shape) cols *= s;
  return cols;
}

inline std::vector<int64_t> leading_sizes(const Tensor& x, int64_t nd) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - nd);
}

template <RMSNormFwdFn Launch>
std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, c10::IntArrayRef normalized_shape, const OptTensor& weight,
                                        double eps) {
  const char* op = "rms_norm_fwd";
  const int64_t cols = check_rms_norm_args(op, x, normalized_shape, weight);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor rstd = at::empty(leading_sizes(x, normalized_shape.size()), x.options().dtype(math_dtype(x.scalar_type())));
  if (x.numel() == 0) return {out, rstd.fill_(1.0 / std::sqrt(eps))};
  const Tensor x2 = as_rows(x, cols);
  const Tensor w = weight ? weight->contiguous() : Tensor();
  RMSNormParams p;
  p.rows = x2.size(0), p.cols = cols, p.eps = eps, p.dtype = to_dtype(x.scalar_type(), op, "x");
  p.x = x2.data_ptr(), p.x_row_stride = row_stride(x2);
  p.weight = weight ? w.data_ptr() : nullptr;
  p.out = out.data_ptr(), p.rstd = rstd.data_ptr();
  Launch(p);
  return {out, rstd};
}

template <RMSNormBwdFn Launch>
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dout, const Tensor& x, c10::IntArrayRef normalized_shape,
                                        const OptTensor& weight, const Tensor& rstd) {
  const char* op = "rms_norm_bwd";
  const int64_t cols = check_rms_norm_args(op, x, normalized_shape, weight);
  check_same(op, "dout", dout, "x", x);
  const auto leading = leading_sizes(x, normalized_shape.size());
  TORCH_CHECK(rstd.device() == x.device() && rstd.scalar_type() == math_dtype(x.scalar_type()) &&
                  rstd.sizes() == c10::IntArrayRef(leading),
              op, ": rstd must be ", math_dtype(x.scalar_type()), " of shape ", shape_str(leading), " on ", x.device(),
              " (rms_norm_fwd's), got ", rstd.scalar_type(), " of shape ", shape_str(rstd.sizes()), " on ",
              rstd.device());
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dweight = weight ? at::zeros(weight->sizes(), weight->options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dweight};
  const Tensor x2 = as_rows(x, cols), dout2 = as_rows(dout, cols), rstd1 = rstd.reshape({-1}).contiguous();
  const Tensor w = weight ? weight->contiguous() : Tensor();
  RMSNormBwdParams p;
  p.rows = x2.size(0), p.cols = cols, p.dtype = to_dtype(x.scalar_type(), op, "x");
  p.x = x2.data_ptr(), p.x_row_stride = row_stride(x2);
  p.dout = dout2.data_ptr(), p.dout_row_stride = row_stride(dout2);
  p.rstd = rstd1.data_ptr();
  p.dx = dx.data_ptr();
  Tensor partial;
  if (weight) {
    p.weight = w.data_ptr(), p.dweight = dweight.data_ptr();
    partial = at::empty({rms_norm_row_blocks(p.rows), cols}, x.options().dtype(math_dtype(x.scalar_type())));
    p.dweight_partial = partial.data_ptr();
  }
  Launch(p);
  return {dx, dweight};
}

// ---- rotary_emb -------------------------------------------------------------------------------------

using RotaryFn = void (*)(const RotaryParams&);

template <RotaryFn Launch>
Tensor rotary_emb(const Tensor& x, const Tensor& cos, const Tensor& sin, bool conjugate) {
  const char* op = "rotary_emb";
  const auto dt = to_dtype(x.scalar_type(), op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (batch, seqlen, nheads, headdim), got ", shape_str(x.sizes()));
  const int64_t batch = x.size(0), seqlen = x.size(1), nheads = x.size(2), headdim = x.size(3);
  TORCH_CHECK(headdim % 2 == 0, op, ": headdim (x.shape[-1]) must be even, got ", headdim);
  TORCH_CHECK(x.stride(3) == 1 || headdim <= 1, op, ": x must have a contiguous last dimension, got stride ",
              x.stride(3));
  const auto mt = math_dtype(x.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                "; all tensors must be on one device");
    TORCH_CHECK(t.scalar_type() == mt, op, ": ", name, " must be ", mt, " (the math dtype for x of ",
                x.scalar_type(), "), got ", t.scalar_type());
    const bool shape_ok = (t.dim() == 2 && t.size(0) == seqlen && t.size(1) == headdim / 2) ||
                          (t.dim() == 3 && t.size(0) == batch && t.size(1) == seqlen && t.size(2) == headdim / 2);
    TORCH_CHECK(shape_ok, op, ": ", name, " must have shape (seqlen, headdim / 2) = (", seqlen, ", ", headdim / 2,
                ") or (batch, seqlen, headdim / 2), got ", shape_str(t.sizes()));
  }
  Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const Tensor c = cos.stride(-1) == 1 ? cos : cos.contiguous();
  const Tensor s = sin.stride(-1) == 1 ? sin : sin.contiguous();
  RotaryParams p;
  p.batch = batch, p.seqlen = seqlen, p.nheads = nheads, p.headdim = headdim, p.conjugate = conjugate, p.dtype = dt;
  p.x = x.data_ptr(), p.x_batch_stride = x.stride(0), p.x_seq_stride = x.stride(1), p.x_head_stride = x.stride(2);
  p.cos = c.data_ptr(), p.sin = s.data_ptr();
  p.cos_batch_stride = c.dim() == 3 ? c.stride(0) : 0, p.cos_seq_stride = c.stride(-2);
  p.sin_batch_stride = s.dim() == 3 ? s.stride(0) : 0, p.sin_seq_stride = s.stride(-2);
  p.out = out.data_ptr();
  Launch(p);
  return out;
}

// ---- swiglu -----------------------------------------------------------------------------------------

using SwiGLUFwdFn = void (*)(const SwiGLUParams&);
using SwiGLUBwdFn = void (*)(const SwiGLUBwdParams&);

inline int64_t check_swiglu_args(const char* op, const Tensor& gate, const Tensor& up) {
  to_dtype(gate.scalar_type(), op, "gate");
  check_same(op, "up", up, "gate", gate);
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dimension, got a scalar");
  return gate.size(-1);
}

inline void set_swiglu_params(SwiGLUParams& p, const Tensor& gate2, const Tensor& up2) {
  p.rows = gate2.size(0), p.cols = gate2.size(1), p.dtype = to_dtype(gate2.scalar_type(), "swiglu", "gate");
  p.gate = gate2.data_ptr(), p.up = up2.data_ptr();
  p.gate_row_stride = row_stride(gate2), p.up_row_stride = row_stride(up2);
}

template <SwiGLUFwdFn Launch>
Tensor swiglu_fwd(const Tensor& gate, const Tensor& up) {
  const int64_t cols = check_swiglu_args("swiglu_fwd", gate, up);
  Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return out;
  const Tensor g = as_rows(gate, cols), u = as_rows(up, cols);
  SwiGLUParams p;
  set_swiglu_params(p, g, u);
  p.out = out.data_ptr();
  Launch(p);
  return out;
}

template <SwiGLUBwdFn Launch>
std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up) {
  const int64_t cols = check_swiglu_args("swiglu_bwd", gate, up);
  check_same("swiglu_bwd", "dout", dout, "gate", gate);
  Tensor dgate = at::empty(gate.sizes(), gate.options()), dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {dgate, dup};
  const Tensor g = as_rows(gate, cols), u = as_rows(up, cols), d = as_rows(dout, cols);
  SwiGLUBwdParams p;
  set_swiglu_params(p, g, u);
  p.dout = d.data_ptr(), p.dout_row_stride = row_stride(d);
  p.dgate = dgate.data_ptr(), p.dup = dup.data_ptr();
  Launch(p);
  return {dgate, dup};
}

// Registers the layer ops for one dispatch key (CPU or CUDA) with that backend's launchers.
#define FASTDL_REGISTER_LAYER_IMPLS(m, RMS_FWD, RMS_BWD, ROTARY, SWIGLU_FWD, SWIGLU_BWD)  \
  m.impl("rms_norm_fwd", &fastdl::layers::rms_norm_fwd<RMS_FWD>);                          \
  m.impl("rms_norm_bwd", &fastdl::layers::rms_norm_bwd<RMS_BWD>);                          \
  m.impl("rotary_emb", &fastdl::layers::rotary_emb<ROTARY>);                               \
  m.impl("swiglu_fwd", &fastdl::layers::swiglu_fwd<SWIGLU_FWD>);                           \
  m.impl("swiglu_bwd", &fastdl::layers::swiglu_bwd<SWIGLU_BWD>)

}  // namespace fastdl::layers
