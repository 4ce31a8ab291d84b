// CUDA registration of the recurrent ops (schemas in csrc/ops.cpp): the fused cells of rnn_cell_kernel.cuh
// and the sequence layer, forward and backward through time, with the time loop here in C++.
//
// rnn_layer: the input projection of all steps is one GEMM (X W_ih^T + b_ih (+ b_hh): [N, I] x [I, G*H]);
// then per step the recurrent GEMM on the step's rows (cuBLAS through at::mm_out into a preallocated
// buffer) and the fused cell kernel, which writes the new state, the step's output rows and everything the
// backward needs into the workspace (h_{t-1}, activations, c_{t-1}, c_t); with proj_size, one more GEMM per
// step (h = r W_hr^T) and two row copies. Two launches per step (plus a copy on the steps where packed
// sequences end), all on the current stream; nothing synchronises.
// rnn_layer_backward walks the steps in reverse: per step the fused cell backward (which also adds the step's
// d output) and one GEMM (d h_{t-1} = d gates W_hh); after the loop, d input and every weight gradient are one
// GEMM each over all rows, and the bias gradients column sums. cuBLAS GEMMs and torch's reductions are
// deterministic, so two runs give bit-identical results.
//
// The workspace has the CPU layout (lstm_params.h's workspace_layout), so shapes and the fake kernels agree.
// Dtypes: as on the CPU fp32, fp64 (gradcheck) and bf16, and on CUDA also fp16; bf16 and fp16 are converted
// to fp32 at the boundary (the state stays fp32 between steps). Built by setup.py only (it needs torch's CUDA headers).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lstm/lstm_ops.h"
#include "lstm/rnn_cell_launch.h"
#include "lstm/rnn_cell_ops.h"

namespace fastdl::rnn {
namespace {

using OptTensor = std::optional<Tensor>;

void cell_fwd_cuda(const CellFwdParams& p) { C10_CUDA_CHECK(launch_rnn_cell_fwd(p, at::cuda::getCurrentCUDAStream())); }
void cell_bwd_cuda(const CellBwdParams& p) { C10_CUDA_CHECK(launch_rnn_cell_bwd(p, at::cuda::getCurrentCUDAStream())); }

// The k-th step in processing order, and its rows (0 outside [0, T)).
int64_t step_at(const LayerShape& s, bool reverse, int64_t k) { return reverse ? s.seq_len - 1 - k : k; }
int64_t rows_at(const LayerShape& s, bool reverse, int64_t k) {
  return k < 0 || k >= s.seq_len ? 0 : s.batch_sizes[step_at(s, reverse, k)];
}

Tensor rows(const Tensor& t, int64_t first, int64_t n) { return t.narrow(0, first, n); }
Tensor cols(const Tensor& t, int64_t first, int64_t n) { return t.narrow(1, first, n); }

}  // namespace

// The CUDA implementations (external linkage: the emulator tests call them directly).

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_cuda(const Tensor& input, const OptTensor& batch_sizes,
                                                          const Tensor& hx, const OptTensor& cx, const Tensor& w_ih,
                                                          const Tensor& w_hh, const OptTensor& b_ih,
                                                          const OptTensor& b_hh, const OptTensor& w_hr,
                                                          c10::string_view mode_str, bool reverse,
                                                          bool save_workspace) {
  const Mode mode = parse_mode(mode_str);
  const LayerShape s = check_layer_args("rnn_layer", mode, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto dtype = input.scalar_type();
  const auto mopts = input.options().dtype(math_type(dtype));
  const int64_t P = s.state(), H = s.hidden, GH = num_gates(mode) * H, B = s.batch;
  const bool lstm = mode == Mode::kLSTM, gru = mode == Mode::kGRU, proj = s.proj > 0;
  const WorkspaceLayout L = workspace_layout(mode, H, s.proj);

  const Tensor x = as_math(input).reshape({s.rows, s.input_size}), h0 = as_math(hx), wi = as_math(w_ih);
  const Tensor wh = as_math(w_hh);
  const auto c0 = lstm ? as_math(cx) : std::nullopt;
  const auto bi = as_math(b_ih), bh = as_math(b_hh), wr = as_math(w_hr);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = P;
  Tensor output = at::empty(out_shape, mopts);
  const Tensor out = output.view({s.rows, P});
  Tensor hy = at::empty({B, P}, mopts);
  Tensor cy = lstm ? at::empty({B, H}, mopts) : at::empty({0}, input.options());
  Tensor workspace = save_workspace ? at::empty({s.rows, L.width}, mopts) : at::empty({0}, mopts);
  if (s.rows == 0) {
    hy.copy_(h0);
    if (lstm) cy.copy_(*c0);
    return {to_result(output, dtype), to_result(hy, dtype), lstm ? to_result(cy, dtype) : cy, workspace};
  }

  // X W_ih^T + b_ih + b_hh for every step at once (GRU keeps b_hh for the cell, where b_hn is scaled by r).
  std::optional<Tensor> bias_x;
  if (bi) bias_x = *bi;
  if (bh && !gru) bias_x = bias_x ? *bias_x + *bh : *bh;
  const Tensor gx = bias_x ? at::addmm(*bias_x, x, wi.t()) : at::mm(x, wi.t());  // [N, G*H]

  // The state starts as h0 / c0 for every row: a row joins the recurrence when its sequence starts. h
  // ping-pongs between two buffers (a step reads one and writes the other), c is updated in place.
  Tensor h_state = h0.unsqueeze(0).repeat({2, 1, 1});  // [2, B, P]
  Tensor c_state = lstm ? c0->clone() : Tensor();
  Tensor gh = at::empty({B, GH}, mopts);
  Tensor r_state = proj ? at::empty({B, H}, mopts) : Tensor();
  int cur = 0;
  for (int64_t k = 0; k < s.seq_len; ++k) {
    const int64_t t = step_at(s, reverse, k), bs = s.batch_sizes[t], off = s.offsets[t];
    const Tensor hs = h_state[cur], hn = h_state[1 - cur];
    const Tensor row = save_workspace ? rows(workspace, off, bs) : Tensor();
    Tensor ghs = rows(gh, 0, bs);
    at::mm_out(ghs, rows(hs, 0, bs), wh.t());

    CellFwdParams c;
    c.mode = mode;
    c.dtype = to_dtype(dtype);
    c.batch = bs;
    c.hidden = H;
    c.igates = rows(gx, off, bs).data_ptr(), c.igates_stride = GH;
    c.hgates = ghs.data_ptr(), c.hgates_stride = GH;
    c.b_hh = gru ? ptr(bh) : nullptr;
    c.h_prev = hs.data_ptr(), c.h_prev_stride = P;
    if (lstm) {
      c.c_prev = c_state.data_ptr(), c.c_prev_stride = H;
      c.c_out = c_state.data_ptr(), c.c_out_stride = H;
    }
    const Tensor r = proj ? (save_workspace ? cols(row, L.r, H) : rows(r_state, 0, bs)) : Tensor();
    c.h_out = proj ? r.data_ptr() : hn.data_ptr();
    c.h_out_stride = proj ? r.stride(0) : P;
    // The cell kernel also fills the workspace's h_{t-1}, c_{t-1}, c_t and (without projection) the output
    // rows: one launch instead of four copies.
    CellFwdCopies copies;
    Tensor out_t = rows(out, off, bs);
    if (save_workspace) {
      c.saved = cols(row, L.saved, num_saved(mode) * H).data_ptr(), c.saved_stride = L.width;
      if (proj) {
        cols(row, L.hprev, P).copy_(rows(hs, 0, bs));
      } else {
        copies.h_prev = cols(row, L.hprev, P).data_ptr(), copies.h_prev_stride = L.width;
      }
      if (lstm) {
        copies.c_prev = cols(row, L.cprev, H).data_ptr(), copies.c_prev_stride = L.width;
        copies.c_out = cols(row, L.c, H).data_ptr(), copies.c_out_stride = L.width;
      }
    }
    if (!proj) copies.h_out = out_t.data_ptr(), copies.h_out_stride = P;
    C10_CUDA_CHECK(launch_rnn_cell_fwd_copying(c, copies, at::cuda::getCurrentCUDAStream()));

    if (proj) {
      at::mm_out(out_t, r, wr->t());
      rows(hn, 0, bs).copy_(out_t);
    }
    // Rows whose sequence ends here have their final state.
    const int64_t next = rows_at(s, reverse, k + 1);
    if (bs > next) rows(hy, next, bs - next).copy_(rows(hn, next, bs - next));
    cur = 1 - cur;
  }
  if (lstm) cy.copy_(c_state);
  return {to_result(output, dtype), to_result(hy, dtype), lstm ? to_result(cy, dtype) : cy, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_layer_backward_cuda(
    const OptTensor& grad_output, const OptTensor& grad_hy, const OptTensor& grad_cy, const Tensor& input,
    const OptTensor& batch_sizes, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr,
    const Tensor& workspace, c10::string_view mode_str, bool reverse, bool has_bias, bool input_grad) {
  const char* op = "rnn_layer_backward";
  const Mode mode = parse_mode(mode_str);
  const bool lstm = mode == Mode::kLSTM, gru = mode == Mode::kGRU;
  const LayerShape s = check_layer_args(op, mode, input, batch_sizes, hx, std::nullopt, w_ih, w_hh, std::nullopt,
                                        std::nullopt, w_hr, /*check_cx=*/false);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto dtype = input.scalar_type();
  const auto mtype = math_type(dtype);
  const auto mopts = input.options().dtype(mtype);
  const int64_t P = s.state(), H = s.hidden, GH = num_gates(mode) * H, B = s.batch, I = s.input_size;
  const bool proj = s.proj > 0;
  const WorkspaceLayout L = workspace_layout(mode, H, s.proj);
  TORCH_CHECK(workspace.scalar_type() == mtype && workspace.sizes() == c10::IntArrayRef({s.rows, L.width}), op,
              ": workspace must be the ", mtype, " tensor of shape ", shape_str({s.rows, L.width}),
              " that rnn_layer returned with save_workspace=True, got ", workspace.scalar_type(), " ",
              shape_str(workspace.sizes()));
  TORCH_CHECK(workspace.device() == input.device(), op, ": workspace is on ", workspace.device(), " but input is on ",
              input.device(), "; all tensors must be on one device");
  SameKind same(op, input, "input");
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = P;
  auto grad_arg = [&](const OptTensor& g, c10::IntArrayRef shape, const char* name) {
    if (!g.has_value()) return OptTensor();
    same(*g, name);
    CHECK_SHAPE(*g, shape);
    return OptTensor(as_math(*g));
  };
  const auto g_out = grad_arg(grad_output, out_shape, "grad_output");
  const auto g_hy = grad_arg(grad_hy, {B, P}, "grad_hy");
  const auto g_cy = lstm ? grad_arg(grad_cy, {B, H}, "grad_cy") : std::nullopt;

  const Tensor x = as_math(input).reshape({s.rows, I}), wi = as_math(w_ih), wh = as_math(w_hh);
  const Tensor ws = workspace.contiguous();
  const auto wr = as_math(w_hr);
  Tensor grad_h0 = at::empty({B, P}, mopts);
  Tensor grad_c0 = lstm ? at::empty({B, H}, mopts) : at::empty({0}, input.options());
  if (s.rows == 0) {
    g_hy ? grad_h0.copy_(*g_hy) : grad_h0.zero_();
    if (lstm) g_cy ? grad_c0.copy_(*g_cy) : grad_c0.zero_();
    auto zeros = [&](c10::IntArrayRef shape) { return at::zeros(shape, input.options()); };
    return {input_grad ? zeros(input.sizes()) : zeros({0}), to_result(grad_h0, dtype), to_result(grad_c0, dtype),
            zeros({GH, I}), zeros({GH, P}), has_bias ? zeros({GH}) : zeros({0}), has_bias ? zeros({GH}) : zeros({0}),
            proj ? zeros({P, H}) : zeros({0})};
  }

  const Tensor g_out2 = g_out ? g_out->reshape({s.rows, P}) : Tensor();
  Tensor dgx = at::empty({s.rows, GH}, mopts);
  Tensor dgh = gru ? at::empty({s.rows, GH}, mopts) : dgx;  // d (h W_hh^T): differs from dgx for GRU only
  Tensor dh = at::empty({B, P}, mopts), dc = lstm ? at::empty({B, H}, mopts) : Tensor();
  Tensor dh_all = proj ? at::empty({s.rows, P}, mopts) : Tensor();
  Tensor dr = proj ? at::empty({B, H}, mopts) : Tensor();

  for (int64_t k = s.seq_len - 1; k >= 0; --k) {
    const int64_t t = step_at(s, reverse, k), bs = s.batch_sizes[t], off = s.offsets[t];
    const Tensor row = rows(ws, off, bs);
    // Rows whose sequence ended at this step in the forward start from d hy / d cy; the others carry
    // d h_t, d c_t from the step after.
    const int64_t next = rows_at(s, reverse, k + 1);
    if (bs > next) {
      g_hy ? rows(dh, next, bs - next).copy_(rows(*g_hy, next, bs - next)) : rows(dh, next, bs - next).zero_();
      if (lstm)
        g_cy ? rows(dc, next, bs - next).copy_(rows(*g_cy, next, bs - next)) : rows(dc, next, bs - next).zero_();
    }
    Tensor dhs = rows(dh, 0, bs);
    // Without projection the cell kernel adds the step's d output as it reads d h (one launch less).
    const Tensor g_out_t = g_out ? rows(g_out2, off, bs) : Tensor();
    if (g_out && proj) dhs.add_(g_out_t);
    Tensor grad_h = dhs;
    if (proj) {
      // h_t = r_t W_hr^T: keep d h_t for grad_w_hr, and d r_t = d h_t W_hr feeds the cell.
      rows(dh_all, off, bs).copy_(dhs);
      grad_h = rows(dr, 0, bs);
      at::mm_out(grad_h, dhs, *wr);
    }

    CellBwdParams c;
    c.mode = mode;
    c.dtype = to_dtype(dtype);
    c.batch = bs;
    c.hidden = H;
    c.grad_h = grad_h.data_ptr(), c.grad_h_stride = grad_h.stride(0);
    c.saved = cols(row, L.saved, num_saved(mode) * H).data_ptr(), c.saved_stride = L.width;
    c.h_prev = cols(row, L.hprev, P).data_ptr(), c.h_prev_stride = L.width;
    if (lstm) {
      c.grad_c = dc.data_ptr(), c.grad_c_stride = H;
      c.c_prev = cols(row, L.cprev, H).data_ptr(), c.c_prev_stride = L.width;
      c.c_out = cols(row, L.c, H).data_ptr(), c.c_out_stride = L.width;
      c.grad_c_prev = dc.data_ptr(), c.grad_c_prev_stride = H;
    }
    c.grad_igates = rows(dgx, off, bs).data_ptr(), c.grad_igates_stride = GH;
    if (gru) {
      c.grad_hgates = rows(dgh, off, bs).data_ptr(), c.grad_hgates_stride = GH;
      c.grad_h_prev = dh.data_ptr(), c.grad_h_prev_stride = P;  // z * d h; the W_hh path is added below
    }
    const bool add = g_out && !proj;
    C10_CUDA_CHECK(launch_rnn_cell_bwd_adding(c, add ? g_out_t.data_ptr() : nullptr, add ? g_out_t.stride(0) : 0,
                                              at::cuda::getCurrentCUDAStream()));
    // d h_{t-1} (+)= d gates_h W_hh
    if (gru) {
      dhs.addmm_(rows(dgh, off, bs), wh);
    } else {
      at::mm_out(dhs, rows(dgh, off, bs), wh);
    }
    // Rows that joined at this step took h0 / c0.
    const int64_t joined = rows_at(s, reverse, k - 1);
    if (bs > joined) {
      rows(grad_h0, joined, bs - joined).copy_(rows(dh, joined, bs - joined));
      if (lstm) rows(grad_c0, joined, bs - joined).copy_(rows(dc, joined, bs - joined));
    }
  }

  // d input and the weight gradients over all rows at once.
  Tensor grad_input = input_grad ? at::mm(dgx, wi).view(input.sizes()) : at::empty({0}, input.options());
  Tensor grad_w_ih = at::mm(dgx.t(), x);                   // [G*H, I]
  Tensor grad_w_hh = at::mm(dgh.t(), cols(ws, L.hprev, P));  // [G*H, P]
  Tensor grad_w_hr = proj ? at::mm(dh_all.t(), cols(ws, L.r, H)) : at::empty({0}, input.options());  // [P, H]
  Tensor grad_b_ih = has_bias ? dgx.sum(0) : at::empty({0}, input.options());
  Tensor grad_b_hh = has_bias ? (gru ? dgh.sum(0) : grad_b_ih.clone()) : at::empty({0}, input.options());
  return {to_result(grad_input, dtype), to_result(grad_h0, dtype), to_result(grad_c0, dtype),
          to_result(grad_w_ih, dtype), to_result(grad_w_hh, dtype), to_result(grad_b_ih, dtype),
          to_result(grad_b_hh, dtype), to_result(grad_w_hr, dtype)};
}

// The cell ops: rnn_cell_ops.h's bodies with the CUDA cell launchers, on the inputs' device.

std::tuple<Tensor, Tensor, Tensor> lstm_cell_cuda(const Tensor& igates, const Tensor& hgates, const Tensor& cx,
                                                  const OptTensor& b_ih, const OptTensor& b_hh) {
  const c10::cuda::CUDAGuard guard(igates.device());
  return lstm_cell<cell_fwd_cuda>(igates, hgates, cx, b_ih, b_hh);
}

std::tuple<Tensor, Tensor> lstm_cell_backward_cuda(const OptTensor& grad_hy, const OptTensor& grad_cy,
                                                   const Tensor& cx, const Tensor& cy, const Tensor& workspace) {
  const c10::cuda::CUDAGuard guard(cx.device());
  return lstm_cell_backward<cell_bwd_cuda>(grad_hy, grad_cy, cx, cy, workspace);
}

std::tuple<Tensor, Tensor> gru_cell_cuda(const Tensor& igates, const Tensor& hgates, const Tensor& hx,
                                         const OptTensor& b_ih, const OptTensor& b_hh) {
  const c10::cuda::CUDAGuard guard(igates.device());
  return gru_cell<cell_fwd_cuda>(igates, hgates, hx, b_ih, b_hh);
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_backward_cuda(const Tensor& grad_hy, const Tensor& hx,
                                                          const Tensor& workspace) {
  const c10::cuda::CUDAGuard guard(hx.device());
  return gru_cell_backward<cell_bwd_cuda>(grad_hy, hx, workspace);
}

std::tuple<Tensor, Tensor> rnn_cell_cuda(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                                         const OptTensor& b_hh, bool relu) {
  const c10::cuda::CUDAGuard guard(igates.device());
  return rnn_cell<cell_fwd_cuda>(igates, hgates, b_ih, b_hh, relu);
}

Tensor rnn_cell_backward_cuda(const Tensor& grad_hy, const Tensor& workspace, bool relu) {
  const c10::cuda::CUDAGuard guard(grad_hy.device());
  return rnn_cell_backward<cell_bwd_cuda>(grad_hy, workspace, relu);
}

}  // namespace fastdl::rnn

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("rnn_layer", &fastdl::rnn::rnn_layer_cuda);
  m.impl("rnn_layer_backward", &fastdl::rnn::rnn_layer_backward_cuda);
  m.impl("lstm_cell", &fastdl::rnn::lstm_cell_cuda);
  m.impl("lstm_cell_backward", &fastdl::rnn::lstm_cell_backward_cuda);
  m.impl("gru_cell", &fastdl::rnn::gru_cell_cuda);
  m.impl("gru_cell_backward", &fastdl::rnn::gru_cell_backward_cuda);
  m.impl("rnn_cell", &fastdl::rnn::rnn_cell_cuda);
  m.impl("rnn_cell_backward", &fastdl::rnn::rnn_cell_backward_cuda);
}
