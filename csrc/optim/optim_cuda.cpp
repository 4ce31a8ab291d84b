// CUDA registration of the fused optimizer ops: the op bodies of optim_ops.h (checks, pointer
// gathering) with launch_cuda, which runs the step on the current stream of the params' device.
// The kernels are in optim_kernel.cuh; this file is built by setup.py only (it needs torch's CUDA
// headers), the kernels also by the CMake compile check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "optim/optim_ops.h"

namespace fastdl::optim {

// optim_launch.cu: the whole step on `stream`, asynchronously; returns the first launch error.
cudaError_t launch_multi_tensor_step(const MultiTensorParams& mt, cudaStream_t stream);

namespace {

// The device of the step's tensors, or -1 when no tensor has storage. A LaunchFn sees raw pointers
// only, so the device is read back from one of them (collect() has checked that they all share
// it). Empty tensors may have no storage, hence the search; one-element step counters always do.
c10::DeviceIndex step_device(const MultiTensorParams& mt) {
  const void* probe = nullptr;
  for (int64_t t = 0; t < mt.num_tensors && probe == nullptr; ++t) probe = mt.params[t];
  if (probe == nullptr && mt.steps != nullptr) probe = mt.steps[0];
  if (probe == nullptr) return -1;
  cudaPointerAttributes attributes{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, probe));
  TORCH_CHECK(attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged,
              "fastdl fused optimizer: expected parameters in CUDA device memory, got cudaMemoryType ",
              static_cast<int>(attributes.type));
  return static_cast<c10::DeviceIndex>(attributes.device);
}

void launch_cuda(const MultiTensorParams& mt) {
  const c10::DeviceIndex device = step_device(mt);
  if (device < 0) return;  // every tensor empty and no counters: nothing to update
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
  MultiTensorParams params = mt;
  // LAMB's per-tensor sums of squares, accumulated by atomics from zero. Allocated on the current
  // stream, which also runs the kernels, so the caching allocator may hand the memory out again
  // when `norms` goes out of scope: later work on this stream is ordered after the step.
  at::Tensor norms;
  if (mt.rule == Rule::kLAMB) {
    norms = at::zeros({2 * mt.num_tensors}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, device));
    params.norms = norms.data_ptr<double>();
  }
  C10_CUDA_CHECK(launch_multi_tensor_step(params, stream));
}

}  // namespace
}  // namespace fastdl::optim

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) { FASTDL_REGISTER_OPTIM_IMPLS(m, fastdl::optim::launch_cuda); }
