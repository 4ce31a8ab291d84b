// Python module of the emulated CUDA fused conv2d: the real binding's functions (csrc/conv/conv_cuda.cpp,
// compiled against the stub CUDA headers of include/) on CPU tensors, the kernels (conv_kernel.cuh,
// conv_bwd_kernel.cuh) run by the emulator, which checks every shared-memory access for races and bounds,
// and the cp.async reads of x against x's span.
#include <torch/extension.h>

#include "conv/conv_ops.h"
#include "emu_runtime.h"

namespace fastdl::conv {
Tensor conv2d_fused_cuda(const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
                         c10::IntArrayRef, int64_t, const OptTensor&, const OptTensor&, c10::string_view, double,
                         const OptTensor&);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv2d_fused_backward_cuda(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
    c10::IntArrayRef, int64_t, const OptTensor&, const OptTensor&, c10::string_view, double, const OptTensor&);

// The global memory the conv kernels' cp.async may read: x, the span its strides cover.
void emu_register_ranges(const Conv2dParams& p) {
  const int64_t sizes[4] = {p.batch, p.in_channels, p.in_h, p.in_w};
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < 4; ++i) {
    if (sizes[i] == 0) return;
    (p.x_stride[i] >= 0 ? hi : lo) += (sizes[i] - 1) * p.x_stride[i];
  }
  const int64_t elem = p.input_dtype == DType::kFloat32 ? 4 : p.input_dtype == DType::kFloat64 ? 8 : 2;
  emu::add_read_range(static_cast<const char*>(p.x) + lo * elem, static_cast<size_t>((hi - lo + 1) * elem));
}

}  // namespace fastdl::conv

namespace {

namespace cv = fastdl::conv;

// The schemas' argument order (csrc/ops.cpp): padding as 4 ints (top, bottom, left, right).
at::Tensor fwd(const at::Tensor& x, const at::Tensor& weight, const cv::OptTensor& bias, std::vector<int64_t> stride,
               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, const cv::OptTensor& scale,
               const cv::OptTensor& shift, const std::string& activation, double slope,
               const cv::OptTensor& residual) {
  return cv::conv2d_fused_cuda(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, slope,
                               residual);
}

std::vector<at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                            const cv::OptTensor& bias, std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, int64_t groups, const cv::OptTensor& scale,
                            const cv::OptTensor& shift, const std::string& activation, double slope,
                            const cv::OptTensor& residual) {
  auto r = cv::conv2d_fused_backward_cuda(grad_out, x, weight, bias, stride, padding, dilation, groups, scale, shift,
                                          activation, slope, residual);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r)};
}

pybind11::dict stats() {
  const auto& s = emu::stats();
  pybind11::dict d;
  d["ctas"] = s.ctas;
  d["mma"] = s.mma;
  d["ldmatrix"] = s.ldmatrix;
  d["syncs"] = s.syncs;
  d["launches"] = s.launches;
  d["max_smem"] = s.max_smem;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("stats", &stats);
  m.def("reset_stats", [] { emu::stats() = emu::Stats{}; });
  m.def("set_schedule", &emu::set_schedule, "thread visit order: 0 ascending, 1 descending, 2 random");
}
