// CUDA registration of the causal conv1d ops (schemas in csrc/ops.cpp): the op bodies of
// causal_conv1d_ops.h, shared with the CPU registration, run with launchers that call the kernels of
// causal_conv1d_launch.h on the current stream. Before the body, each op rejects fp64 (CPU only) and
// sets the device. Built by setup.py only (it needs torch's CUDA headers); the kernels are also built by
// the CMake compile check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "causal_conv1d/causal_conv1d_launch.h"
#include "causal_conv1d/causal_conv1d_ops.h"

namespace fastdl::causal_conv1d {
namespace {

constexpr int64_t kMaxGridY = 65535;  // the kernels launch (batch * dim, tiles of 512 steps) grids

void fwd_launch(const ConvParams& p) {
  C10_CUDA_CHECK(launch_causal_conv1d_fwd(p, at::cuda::getCurrentCUDAStream()));
}

void bwd_launch(const ConvBwdParams& p) {
  // Per-block dweight / dbias partials from the caching allocator on the current device (see
  // selective_scan_cuda.cpp on freeing it while the kernels run).
  const int64_t floats = causal_conv1d_bwd_scratch_floats(p);
  const at::DataPtr scratch = c10::cuda::CUDACachingAllocator::get()->allocate(std::max<int64_t>(floats, 1) * 4);
  C10_CUDA_CHECK(
      launch_causal_conv1d_bwd(p, static_cast<float*>(scratch.get()), at::cuda::getCurrentCUDAStream()));
}

void update_launch(const ConvUpdateParams& p) {
  C10_CUDA_CHECK(launch_causal_conv1d_update(p, at::cuda::getCurrentCUDAStream()));
}

void check_cuda(const char* op, const Tensor& x) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, op,
              ": on CUDA, x must be float32, float16 or bfloat16, got float64 (float64 runs on the CPU only)");
  TORCH_CHECK(x.dim() != 3 || (x.size(2) + 511) / 512 <= kMaxGridY, op, ": on CUDA, seqlen must be at most ",
              kMaxGridY * 512, ", got ", x.size(2));
}

}  // namespace

// The CUDA implementations (external linkage: the emulator tests call them directly).

Tensor causal_conv1d_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, bool silu) {
  check_cuda("causal_conv1d_fwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv1d_fwd<fwd_launch>(x, weight, bias, silu);
}

std::tuple<Tensor, Tensor, Tensor> causal_conv1d_bwd_cuda(const Tensor& x, const Tensor& weight,
                                                          const OptTensor& bias, const Tensor& dout, bool silu) {
  check_cuda("causal_conv1d_bwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv1d_bwd<bwd_launch>(x, weight, bias, dout, silu);
}

Tensor causal_conv1d_update_cuda(const Tensor& x, const Tensor& conv_state, const Tensor& weight,
                                 const OptTensor& bias, bool silu) {
  check_cuda("causal_conv1d_update", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return causal_conv1d_update<update_launch>(x, conv_state, weight, bias, silu);
}

}  // namespace fastdl::causal_conv1d

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("causal_conv1d_fwd", &fastdl::causal_conv1d::causal_conv1d_fwd_cuda);
  m.impl("causal_conv1d_bwd", &fastdl::causal_conv1d::causal_conv1d_bwd_cuda);
  m.impl("causal_conv1d_update", &fastdl::causal_conv1d::causal_conv1d_update_cuda);
}
