// Python module of the emulated plain-CUDA kernels (those written against common/cuda_simt.cuh): the real
// bindings' functions (csrc/selective_scan/selective_scan_cuda.cpp, csrc/causal_conv1d/causal_conv1d_cuda.cpp,
// compiled against the stub CUDA headers of include/) on CPU tensors, the kernels run by the emulator.
#include <torch/extension.h>

#include "emu_runtime.h"
#include "causal_conv1d/causal_conv1d_ops.h"
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

namespace {

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
  m.def("set_schedule", &emu::set_schedule, "thread visit order: 0 ascending, 1 descending, 2 random");
}
