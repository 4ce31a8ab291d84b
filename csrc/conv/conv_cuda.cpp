// CUDA registration of the fused conv2d ops (schemas in csrc/ops.cpp): the op bodies of conv_ops.h, shared
// with the CPU registration, run with launchers that call conv_launch.h's kernels on the current stream,
// after the checks only the CUDA kernels need. The backward's fp32 workspace comes from the caching
// allocator. Built by setup.py only (it needs torch's CUDA headers); the kernels are also built by the
// CMake check, and this file with the kernels by the CPU emulator (tests/ops/cuda_emu, test_conv_emu.py),
// where it has run; it has not run on a GPU.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "conv/conv_launch.h"
#include "conv/conv_ops.h"

namespace fastdl::conv {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

void check_cuda_params(const char* op, const Conv2dParams& p) {
  TORCH_CHECK(p.input_dtype != DType::kFloat64, op,
              ": on CUDA, x must be float32, float16 or bfloat16 (float64 runs on the CPU only)");
  // The GEMMs' reduction index (kh, kw, channel) is a 32-bit int in the kernels.
  const int64_t taps = p.kernel_h * p.kernel_w, k_max = std::max(p.in_channels, p.out_channels) / p.groups * taps;
  TORCH_CHECK(k_max < (int64_t(1) << 31), op, ": on CUDA, kH * kW * max(C_in, C_out) / groups must be below 2^31, got ",
              k_max);
  const int64_t tiles_out = (p.out_channels / p.groups + kConvTile - 1) / kConvTile;
  TORCH_CHECK(p.groups <= kMaxGridYZ && tiles_out <= kMaxGridYZ, op, ": on CUDA, groups and ceil(C_out / groups / ",
              kConvTile, ") must be at most ", kMaxGridYZ, ", got groups = ", p.groups, " and ", tiles_out);
}

void launch_fwd_cuda(const Conv2dParams& p) {
  check_cuda_params("conv2d_fused", p);
  C10_CUDA_CHECK(launch_conv2d_fwd(p, at::cuda::getCurrentCUDAStream()));
}

void launch_bwd_cuda(const Conv2dBwdParams& params) {
  const char* op = "conv2d_fused_backward";
  check_cuda_params(op, params);
  const int64_t tiles_in = (params.in_channels / params.groups + kConvTile - 1) / kConvTile;
  const int64_t tiles_k =
      (params.kernel_h * params.kernel_w * (params.in_channels / params.groups) + kConvTile - 1) / kConvTile;
  TORCH_CHECK(tiles_in <= kMaxGridYZ && tiles_k <= kMaxGridYZ, op, ": on CUDA, ceil(C_in / groups / ", kConvTile,
              ") and ceil(kH * kW * C_in / groups / ", kConvTile, ") must be at most ", kMaxGridYZ, ", got ",
              tiles_in, " and ", tiles_k);
  Conv2dBwdParams p = params;
  const Conv2dBwdPlan plan = plan_conv2d_bwd(p);
  // On the op's current device (its CUDAGuard set it). Freed on return while the kernels may still run:
  // the allocator hands the block out again only to work queued after them on this stream.
  const at::DataPtr ws =
      c10::cuda::CUDACachingAllocator::get()->allocate(static_cast<size_t>(plan.total_floats()) * sizeof(float));
  set_conv2d_bwd_workspace(p, plan, static_cast<float*>(ws.get()));
  C10_CUDA_CHECK(launch_conv2d_bwd(p, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

// Not in the anonymous namespace: the emulator's glue (tests/ops/cuda_emu/conv_glue.cpp) calls them.
Tensor conv2d_fused_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
                         c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
                         const OptTensor& shift, c10::string_view activation, double slope,
                         const OptTensor& residual) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv2d_fused<launch_fwd_cuda>(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
                                       slope, residual);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv2d_fused_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
    const OptTensor& shift, c10::string_view activation, double slope, const OptTensor& residual) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv2d_fused_backward<launch_bwd_cuda>(grad_out, x, weight, bias, stride, padding, dilation, groups, scale,
                                                shift, activation, slope, residual);
}

namespace {
// The op's schema (csrc/ops.cpp) ends in packed_weight, the CPU forward's weight layout: None on CUDA.
Tensor conv2d_fused_cuda_op(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                            const OptTensor& scale, const OptTensor& shift, c10::string_view activation, double slope,
                            const OptTensor& residual, const OptTensor& packed_weight) {
  TORCH_CHECK(!packed_weight, "conv2d_fused: packed_weight is the CPU kernel's weight layout; pass None on CUDA");
  return conv2d_fused_cuda(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, slope,
                           residual);
}
}  // namespace

}  // namespace fastdl::conv

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("conv2d_fused", &fastdl::conv::conv2d_fused_cuda_op);
  m.impl("conv2d_fused_backward", &fastdl::conv::conv2d_fused_backward_cuda);
}
