// CUDA registration of the selective scan ops (schemas in csrc/ops.cpp): the op bodies of
// selective_scan_ops.h, shared with the CPU registration, run with launchers that call the kernels of
// selective_scan_launch.h on the current stream. Before the body, each op checks what only the CUDA
// kernels need (no fp64, batch within the grid's y limit) and sets the device.
// This file is built by setup.py only (it needs torch's CUDA headers); the kernels are also built by
// the CMake compile check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "selective_scan/selective_scan_launch.h"
#include "selective_scan/selective_scan_ops.h"

namespace fastdl::selective_scan {
namespace {

constexpr int64_t kMaxGridY = 65535;  // the kernels launch (dim, batch) grids

void fwd_launch(const ScanParams& p) { C10_CUDA_CHECK(launch_selective_scan_fwd(p, at::cuda::getCurrentCUDAStream())); }

void bwd_launch(const ScanBwdParams& p) {
  // Partial sums and fp32 dB / dC accumulators from the caching allocator on the current device (the
  // op's CUDAGuard set it). Freed on return while the kernels may still run: the allocator hands the
  // block out again only to work queued after them on this stream.
  const int64_t floats = selective_scan_bwd_scratch_floats(p);
  const at::DataPtr scratch = c10::cuda::CUDACachingAllocator::get()->allocate(std::max<int64_t>(floats, 1) * 4);
  C10_CUDA_CHECK(launch_selective_scan_bwd(p, static_cast<float*>(scratch.get()), at::cuda::getCurrentCUDAStream()));
}

void update_launch(const StateUpdateParams& p) {
  C10_CUDA_CHECK(launch_selective_state_update(p, at::cuda::getCurrentCUDAStream()));
}

void check_cuda(const char* op, const Tensor& u, const char* name) {
  TORCH_CHECK(u.scalar_type() != at::kDouble, op, ": on CUDA, ", name,
              " must be float32, float16 or bfloat16, got float64 (float64 runs on the CPU only)");
  TORCH_CHECK(u.dim() < 1 || u.size(0) <= kMaxGridY, op, ": on CUDA, batch must be at most ", kMaxGridY, ", got ",
              u.size(0));
}

}  // namespace

// The CUDA implementations (external linkage: the emulator tests call them directly).

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                           const Tensor& B, const Tensor& C, const OptTensor& D,
                                                           const OptTensor& z, const OptTensor& delta_bias,
                                                           const OptTensor& initial_state, bool delta_softplus) {
  check_cuda("selective_scan_fwd", u, "u");
  const c10::cuda::CUDAGuard guard(u.device());
  return selective_scan_fwd<fwd_launch>(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cuda(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    const OptTensor& initial_state, const Tensor& checkpoints, bool delta_softplus) {
  check_cuda("selective_scan_bwd", u, "u");
  const c10::cuda::CUDAGuard guard(u.device());
  return selective_scan_bwd<bwd_launch>(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                                        checkpoints, delta_softplus);
}

Tensor selective_state_update_cuda(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                                   const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
                                   const OptTensor& dt_bias, bool dt_softplus) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, "selective_state_update: on CUDA, x must be float32, float16 or "
              "bfloat16, got float64 (float64 runs on the CPU only)");
  const c10::cuda::CUDAGuard guard(x.device());
  return selective_state_update<update_launch>(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus);
}

}  // namespace fastdl::selective_scan

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("selective_scan_fwd", &fastdl::selective_scan::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &fastdl::selective_scan::selective_scan_bwd_cuda);
  m.impl("selective_state_update", &fastdl::selective_scan::selective_state_update_cuda);
}
