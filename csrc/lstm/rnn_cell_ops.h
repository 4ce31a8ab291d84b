// Torch-facing bodies of the fused cell ops (lstm_cell, gru_cell, rnn_cell and their backwards), shared by
// the CPU and CUDA registrations: check the arguments, convert to the math dtype, allocate, fill the cell
// params and call the backend's launcher. The two GEMMs are the caller's (F.linear); the op fuses the rest.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "lstm/lstm_ops.h"
#include "lstm/lstm_params.h"

namespace fastdl::rnn {

using CellFwdFn = void (*)(const CellFwdParams&);
using CellBwdFn = void (*)(const CellBwdParams&);

// The math dtype: fp64 stays fp64, fp32, bf16 and (CUDA) fp16 compute in fp32.
inline at::ScalarType math_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline DType to_dtype(at::ScalarType t) { return t == at::kDouble ? DType::kFloat64 : DType::kFloat32; }

inline Tensor as_math(const Tensor& t) { return t.to(math_type(t.scalar_type())).contiguous(); }
inline std::optional<Tensor> as_math(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(as_math(*t)) : std::nullopt;
}
inline const void* ptr(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }
// A result in the caller's dtype that never aliases an input (the op's schema promises fresh outputs).
inline Tensor to_result(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

struct CellArgs {
  int64_t batch, hidden;
};

inline CellArgs check_cell(const char* op, Mode mode, const Tensor& igates, const Tensor& hgates,
                    const std::optional<Tensor>& state, const char* state_name,
                           const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  SameKind same(op, igates, "input_gates");
  same(hgates, "hidden_gates");
  same(state, state_name);
  same(b_ih, "input_bias");
  same(b_hh, "hidden_bias");
  const int64_t G = num_gates(mode);
  TORCH_CHECK(igates.dim() == 2 && igates.size(1) % G == 0 && igates.size(1) > 0, op,
              ": input_gates must be [batch, ", G, " * hidden_size], got ", shape_str(igates.sizes()));
  const int64_t B = igates.size(0), H = igates.size(1) / G;
  auto check_shape = [&](const Tensor& t, c10::IntArrayRef shape, const char* name, const char* what) {
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_str(shape), what, ", got ",
                shape_str(t.sizes()));
  };
  check_shape(hgates, {B, G * H}, "hidden_gates", "");
  if (state) check_shape(*state, {B, H}, state_name, " [batch, hidden_size]");
  if (b_ih) check_shape(*b_ih, {G * H}, "input_bias", "");
  if (b_hh) check_shape(*b_hh, {G * H}, "hidden_bias", "");
  return {B, H};
}

template <CellFwdFn Launch>
std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& igates, const Tensor& hgates, const Tensor& cx,
                                                 const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const auto [B, H] = check_cell("lstm_cell", Mode::kLSTM, igates, hgates, cx, "cx", b_ih, b_hh);
  const auto dtype = igates.scalar_type();
  const auto mopts = igates.options().dtype(math_type(dtype));
  const Tensor ig = as_math(igates), hg = as_math(hgates), c0 = as_math(cx);
  const auto bi = as_math(b_ih), bh = as_math(b_hh);
  Tensor hy = at::empty({B, H}, mopts), cy = at::empty({B, H}, mopts), ws = at::empty({B, 4 * H}, mopts);
  CellFwdParams p;
  p.mode = Mode::kLSTM, p.dtype = to_dtype(dtype), p.batch = B, p.hidden = H;
  p.igates = ig.data_ptr(), p.igates_stride = 4 * H;
  p.hgates = hg.data_ptr(), p.hgates_stride = 4 * H;
  p.b_ih = ptr(bi), p.b_hh = ptr(bh);
  p.c_prev = c0.data_ptr(), p.c_prev_stride = H;
  p.h_out = hy.data_ptr(), p.h_out_stride = H;
  p.c_out = cy.data_ptr(), p.c_out_stride = H;
  p.saved = ws.data_ptr(), p.saved_stride = 4 * H;
  Launch(p);
  return {to_result(hy, dtype), to_result(cy, dtype), ws};
}

template <CellBwdFn Launch>
std::tuple<Tensor, Tensor> lstm_cell_backward(const std::optional<Tensor>& grad_hy,
                                                  const std::optional<Tensor>& grad_cy, const Tensor& cx,
                                                  const Tensor& cy, const Tensor& workspace) {
  const char* op = "lstm_cell_backward";
  SameKind same(op, cx, "cx");
  same(cy, "cy");
  same(grad_hy, "grad_hy");
  same(grad_cy, "grad_cy");
  TORCH_CHECK(cx.dim() == 2, op, ": cx must be [batch, hidden_size], got ", shape_str(cx.sizes()));
  const int64_t B = cx.size(0), H = cx.size(1);
  const auto dtype = cx.scalar_type();
  const auto mtype = math_type(dtype);
  CHECK_SHAPE(cy, B, H);
  CHECK_SHAPE(workspace, B, 4 * H);
  CHECK_DTYPE(workspace, mtype);
  if (grad_hy) CHECK_SHAPE(*grad_hy, B, H);
  if (grad_cy) CHECK_SHAPE(*grad_cy, B, H);
  const auto mopts = cx.options().dtype(mtype);
  const Tensor c0 = as_math(cx), c1 = as_math(cy), ws = workspace.contiguous();
  const auto dh = as_math(grad_hy), dc = as_math(grad_cy);
  Tensor dgates = at::empty({B, 4 * H}, mopts), dcx = at::empty({B, H}, mopts);
  CellBwdParams p;
  p.mode = Mode::kLSTM, p.dtype = to_dtype(dtype), p.batch = B, p.hidden = H;
  p.grad_h = ptr(dh), p.grad_h_stride = H;
  p.grad_c = ptr(dc), p.grad_c_stride = H;
  p.saved = ws.data_ptr(), p.saved_stride = 4 * H;
  p.c_prev = c0.data_ptr(), p.c_prev_stride = H;
  p.c_out = c1.data_ptr(), p.c_out_stride = H;
  p.grad_igates = dgates.data_ptr(), p.grad_igates_stride = 4 * H;
  p.grad_c_prev = dcx.data_ptr(), p.grad_c_prev_stride = H;
  Launch(p);
  return {to_result(dgates, dtype), to_result(dcx, dtype)};
}

template <CellFwdFn Launch>
std::tuple<Tensor, Tensor> gru_cell(const Tensor& igates, const Tensor& hgates, const Tensor& hx,
                                        const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const auto [B, H] = check_cell("gru_cell", Mode::kGRU, igates, hgates, hx, "hx", b_ih, b_hh);
  const auto dtype = igates.scalar_type();
  const auto mopts = igates.options().dtype(math_type(dtype));
  const Tensor ig = as_math(igates), hg = as_math(hgates), h0 = as_math(hx);
  const auto bi = as_math(b_ih), bh = as_math(b_hh);
  Tensor hy = at::empty({B, H}, mopts), ws = at::empty({B, 4 * H}, mopts);
  CellFwdParams p;
  p.mode = Mode::kGRU, p.dtype = to_dtype(dtype), p.batch = B, p.hidden = H;
  p.igates = ig.data_ptr(), p.igates_stride = 3 * H;
  p.hgates = hg.data_ptr(), p.hgates_stride = 3 * H;
  p.b_ih = ptr(bi), p.b_hh = ptr(bh);
  p.h_prev = h0.data_ptr(), p.h_prev_stride = H;
  p.h_out = hy.data_ptr(), p.h_out_stride = H;
  p.saved = ws.data_ptr(), p.saved_stride = 4 * H;
  Launch(p);
  return {to_result(hy, dtype), ws};
}

template <CellBwdFn Launch>
std::tuple<Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& grad_hy, const Tensor& hx,
                                                         const Tensor& workspace) {
  const char* op = "gru_cell_backward";
  SameKind same(op, hx, "hx");
  same(grad_hy, "grad_hy");
  TORCH_CHECK(hx.dim() == 2, op, ": hx must be [batch, hidden_size], got ", shape_str(hx.sizes()));
  const int64_t B = hx.size(0), H = hx.size(1);
  const auto dtype = hx.scalar_type();
  const auto mtype = math_type(dtype);
  CHECK_SHAPE(grad_hy, B, H);
  CHECK_SHAPE(workspace, B, 4 * H);
  CHECK_DTYPE(workspace, mtype);
  const auto mopts = hx.options().dtype(mtype);
  const Tensor h0 = as_math(hx), dh = as_math(grad_hy), ws = workspace.contiguous();
  Tensor dgx = at::empty({B, 3 * H}, mopts), dgh = at::empty({B, 3 * H}, mopts), dhx = at::empty({B, H}, mopts);
  CellBwdParams p;
  p.mode = Mode::kGRU, p.dtype = to_dtype(dtype), p.batch = B, p.hidden = H;
  p.grad_h = dh.data_ptr(), p.grad_h_stride = H;
  p.saved = ws.data_ptr(), p.saved_stride = 4 * H;
  p.h_prev = h0.data_ptr(), p.h_prev_stride = H;
  p.grad_igates = dgx.data_ptr(), p.grad_igates_stride = 3 * H;
  p.grad_hgates = dgh.data_ptr(), p.grad_hgates_stride = 3 * H;
  p.grad_h_prev = dhx.data_ptr(), p.grad_h_prev_stride = H;
  Launch(p);
  return {to_result(dgx, dtype), to_result(dgh, dtype), to_result(dhx, dtype)};
}

template <CellFwdFn Launch>
std::tuple<Tensor, Tensor> rnn_cell(const Tensor& igates, const Tensor& hgates, const std::optional<Tensor>& b_ih,
                                        const std::optional<Tensor>& b_hh, bool relu) {
  const auto [B, H] = check_cell("rnn_cell", Mode::kRNNTanh, igates, hgates, std::nullopt, "hx", b_ih, b_hh);
  const auto dtype = igates.scalar_type();
  const auto mopts = igates.options().dtype(math_type(dtype));
  const Tensor ig = as_math(igates), hg = as_math(hgates);
  const auto bi = as_math(b_ih), bh = as_math(b_hh);
  Tensor ws = at::empty({B, H}, mopts);
  CellFwdParams p;
  p.mode = relu ? Mode::kRNNReLU : Mode::kRNNTanh, p.dtype = to_dtype(dtype), p.batch = B, p.hidden = H;
  p.igates = ig.data_ptr(), p.igates_stride = H;
  p.hgates = hg.data_ptr(), p.hgates_stride = H;
  p.b_ih = ptr(bi), p.b_hh = ptr(bh);
  p.h_out = ws.data_ptr(), p.h_out_stride = H;
  Launch(p);
  // hy must not alias the workspace (separate outputs of one op).
  return {dtype == ws.scalar_type() ? ws.clone() : ws.to(dtype), ws};
}

template <CellBwdFn Launch>
Tensor rnn_cell_backward(const Tensor& grad_hy, const Tensor& workspace, bool relu) {
  const char* op = "rnn_cell_backward";
  SameKind same(op, grad_hy, "grad_hy");
  TORCH_CHECK(grad_hy.dim() == 2, op, ": grad_hy must be [batch, hidden_size], got ", shape_str(grad_hy.sizes()));
  const auto dtype = grad_hy.scalar_type();
  const auto mtype = math_type(dtype);
  const int64_t B = grad_hy.size(0), H = grad_hy.size(1);
  CHECK_SHAPE(workspace, B, H);
  CHECK_DTYPE(workspace, mtype);
  const Tensor dh = as_math(grad_hy), ws = workspace.contiguous();
  Tensor dg = at::empty({B, H}, dh.options());
  CellBwdParams p;
  p.mode = relu ? Mode::kRNNReLU : Mode::kRNNTanh, p.dtype = to_dtype(dtype), p.batch = B, p.hidden = H;
  p.grad_h = dh.data_ptr(), p.grad_h_stride = H;
  p.saved = ws.data_ptr(), p.saved_stride = H;
  p.grad_igates = dg.data_ptr(), p.grad_igates_stride = H;
  Launch(p);
  return to_result(dg, dtype);
}

// Registers the cell ops for one dispatch key (CPU or CUDA) with that backend's cell launchers.
#define FASTDL_REGISTER_RNN_CELL_IMPLS(m, FWD, BWD)                                 \
  m.impl("lstm_cell", &fastdl::rnn::lstm_cell<FWD>);                              \
  m.impl("lstm_cell_backward", &fastdl::rnn::lstm_cell_backward<BWD>);            \
  m.impl("gru_cell", &fastdl::rnn::gru_cell<FWD>);                                \
  m.impl("gru_cell_backward", &fastdl::rnn::gru_cell_backward<BWD>);              \
  m.impl("rnn_cell", &fastdl::rnn::rnn_cell<FWD>);                                \
  m.impl("rnn_cell_backward", &fastdl::rnn::rnn_cell_backward<BWD>)

}  // namespace fastdl::rnn
