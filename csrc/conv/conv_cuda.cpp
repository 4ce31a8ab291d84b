// CUDA registration of the fused conv2d op (schema in csrc/ops.cpp): the op body of conv_ops.h, shared
// with the CPU registration, run with a launcher that calls conv_launch.h's kernels on the current
// stream, after the checks only the CUDA kernels need. The backward has no CUDA kernel yet and says so.
// Built by setup.py only (it needs torch's CUDA headers); the kernels are also built by the CMake check,
// and this file with the kernels by the CPU emulator (tests/ops/cuda_emu, test_conv_emu.py), where the
// forward has run; it has not run on a GPU.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "conv/conv_launch.h"
#include "conv/conv_ops.h"

namespace fastdl::conv {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

void launch_fwd_cuda(const Conv2dParams& p) {
  TORCH_CHECK(p.input_dtype != DType::kFloat64,
              "conv2d_fused: on CUDA, x must be float32, float16 or bfloat16 (float64 runs on the CPU only)");
  TORCH_CHECK(p.groups <= kMaxGridYZ && (p.out_channels / p.groups + 63) / 64 <= kMaxGridYZ,
              "conv2d_fused: on CUDA, groups and C_out / groups / 64 must be at most ", kMaxGridYZ);
  C10_CUDA_CHECK(launch_conv2d_fwd(p, at::cuda::getCurrentCUDAStream()));
}

void no_cuda_backward(const Conv2dBwdParams&) {
  TORCH_CHECK(false, "conv2d_fused_backward: no CUDA kernel yet (the backward runs on the CPU only); "
              "train on the CPU or use torch.nn.Conv2d on the GPU");
}

}  // namespace

// Not in the anonymous namespace: the emulator's glue (tests/ops/cuda_emu/conv_glue.cpp) calls it.
Tensor conv2d_fused_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, c10::IntArrayRef stride,
                         c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, const OptTensor& scale,
                         const OptTensor& shift, c10::string_view activation, double slope,
                         const OptTensor& residual) {
  const c10::cuda::CUDAGuard guard(x.device());
  return conv2d_fused<launch_fwd_cuda>(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
                                       slope, residual);
}

}  // namespace fastdl::conv

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("conv2d_fused", &fastdl::conv::conv2d_fused_cuda);
  m.impl("conv2d_fused_backward", &fastdl::conv::conv2d_fused_backward<fastdl::conv::no_cuda_backward>);
}
