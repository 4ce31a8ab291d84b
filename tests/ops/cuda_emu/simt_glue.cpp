// Python module of the emulated plain-CUDA kernels (those written against common/cuda_simt.cuh): the real
// bindings' functions (csrc/selective_scan/selective_scan_cuda.cpp, csrc/causal_conv1d/causal_conv1d_cuda.cpp,
// compiled against the stub CUDA headers of include/) on CPU tensors, the kernels run by the emulator.
#include <torch/extension.h>

#include "emu_runtime.h"
#include "causal_conv1d/causal_conv1d_ops.h"
#include "lstm/rnn_cell_ops.h"
#include "selective_scan/selective_scan_ops.h"

namespace fastdl::selective_scan {
std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const OptTensor&, const OptTensor&,
                                                           const OptTensor&, const OptTensor&, bool);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cuda(
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, bool);
Tensor selective_state_update_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool);
}  // namespace fastdl::selective_scan

namespace fastdl::causal_conv1d {
Tensor causal_conv1d_fwd_cuda(const Tensor&, const Tensor&, const OptTensor&, bool);
std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd_cuda(const Tensor&, const Tensor&, const OptTensor&,
                                                          const Tensor&, bool);
Tensor causal_conv1d_update_cuda(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool);
}  // namespace fastdl::causal_conv1d

namespace fastdl::rnn {
using OptTensor = std::optional<Tensor>;
std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_cuda(const Tensor&, const OptTensor&, const Tensor&,
                                                          const OptTensor&, const Tensor&, const Tensor&,
                                                          const OptTensor&, const OptTensor&, const OptTensor&,
                                                          c10::string_view, bool, bool);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_layer_backward_cuda(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, c10::string_view, bool, bool, bool);
std::tuple<Tensor, Tensor, Tensor> lstm_cell_cuda(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                  const OptTensor&);
std::tuple<Tensor, Tensor> lstm_cell_backward_cuda(const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                                   const Tensor&);
std::tuple<Tensor, Tensor> gru_cell_cuda(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                         const OptTensor&);
std::tuple<Tensor, Tensor, Tensor> gru_cell_backward_cuda(const Tensor&, const Tensor&, const Tensor&);
std::tuple<Tensor, Tensor> rnn_cell_cuda(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool);
Tensor rnn_cell_backward_cuda(const Tensor&, const Tensor&, bool);
}  // namespace fastdl::rnn

namespace {

// Tuples as lists, for pybind11.
template <typename... Ts>
std::vector<at::Tensor> as_list(const std::tuple<Ts...>& t) {
  return std::apply([](const auto&... x) { return std::vector<at::Tensor>{x...}; }, t);
}

namespace ss = fastdl::selective_scan;

std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const ss::OptTensor& D, const ss::OptTensor& z,
                            const ss::OptTensor& delta_bias, const ss::OptTensor& initial_state, bool softplus) {
  auto [out, last, ckpt] = ss::selective_scan_fwd_cuda(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus);
  return {out, last, ckpt};
}

std::vector<at::Tensor> bwd(const at::Tensor& dout, const ss::OptTensor& dlast, const at::Tensor& u,
                            const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const ss::OptTensor& D, const ss::OptTensor& z, const ss::OptTensor& delta_bias,
                            const ss::OptTensor& initial_state, const at::Tensor& ckpt, bool softplus) {
  auto r = ss::selective_scan_bwd_cuda(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt,
                                       softplus);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
          std::get<5>(r), std::get<6>(r), std::get<7>(r), std::get<8>(r)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("update", &ss::selective_state_update_cuda);
  m.def("conv_fwd", &fastdl::causal_conv1d::causal_conv1d_fwd_cuda);
  m.def("conv_bwd", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                       const at::Tensor& dout, bool silu) {
    auto [dx, dw, db] = fastdl::causal_conv1d::causal_conv1d_bwd_cuda(x, w, b, dout, silu);
    return std::vector<at::Tensor>{dx, dw, db};
  });
  m.def("conv_update", &fastdl::causal_conv1d::causal_conv1d_update_cuda);
  namespace rnn = fastdl::rnn;
  // The recurrent ops, with the schemas' argument order (mode as a str).
  m.def("rnn_layer", [](const at::Tensor& input, const rnn::OptTensor& batch_sizes, const at::Tensor& hx,
                        const rnn::OptTensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const rnn::OptTensor& b_ih, const rnn::OptTensor& b_hh, const rnn::OptTensor& w_hr,
                        const std::string& mode, bool reverse, bool save_workspace) {
    return as_list(rnn::rnn_layer_cuda(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, mode, reverse,
                                       save_workspace));
  });
  m.def("rnn_layer_backward",
        [](const rnn::OptTensor& grad_output, const rnn::OptTensor& grad_hy, const rnn::OptTensor& grad_cy,
           const at::Tensor& input, const rnn::OptTensor& batch_sizes, const at::Tensor& hx, const at::Tensor& w_ih,
           const at::Tensor& w_hh, const rnn::OptTensor& w_hr, const at::Tensor& workspace, const std::string& mode,
           bool reverse, bool has_bias, bool input_grad) {
          return as_list(rnn::rnn_layer_backward_cuda(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, w_ih,
                                                      w_hh, w_hr, workspace, mode, reverse, has_bias, input_grad));
        });
  m.def("lstm_cell", [](const at::Tensor& ig, const at::Tensor& hg, const at::Tensor& cx, const rnn::OptTensor& bi,
                        const rnn::OptTensor& bh) { return as_list(rnn::lstm_cell_cuda(ig, hg, cx, bi, bh)); });
  m.def("lstm_cell_backward", [](const rnn::OptTensor& dh, const rnn::OptTensor& dc, const at::Tensor& cx,
                                 const at::Tensor& cy, const at::Tensor& ws) {
    return as_list(rnn::lstm_cell_backward_cuda(dh, dc, cx, cy, ws));
  });
  m.def("gru_cell", [](const at::Tensor& ig, const at::Tensor& hg, const at::Tensor& hx, const rnn::OptTensor& bi,
                       const rnn::OptTensor& bh) { return as_list(rnn::gru_cell_cuda(ig, hg, hx, bi, bh)); });
  m.def("gru_cell_backward", [](const at::Tensor& dh, const at::Tensor& hx, const at::Tensor& ws) {
    return as_list(rnn::gru_cell_backward_cuda(dh, hx, ws));
  });
  m.def("rnn_cell", [](const at::Tensor& ig, const at::Tensor& hg, const rnn::OptTensor& bi,
                       const rnn::OptTensor& bh, bool relu) {
    return as_list(rnn::rnn_cell_cuda(ig, hg, bi, bh, relu));
  });
  m.def("rnn_cell_backward", &rnn::rnn_cell_backward_cuda);
  m.def("set_schedule", &emu::set_schedule, "thread visit order: 0 ascending, 1 descending, 2 random");
}
