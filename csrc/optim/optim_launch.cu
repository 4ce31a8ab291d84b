// Entry point of the CUDA optimizer step: picks the storage pair's update kernels (instantiated in
// optim_<dtype>.cu), then advances the step counters once every update kernel has been queued.
#include "optim/optim_kernel.cuh"

namespace fastdl::optim {
namespace {

// 240 tensors x 2 pointers + Hyper fill 3.9 KB of the 4 KB parameter space; one launch serves the
// first 240 tensors of a group, so most steps need a single one.
constexpr int kCounterBatch = 240;
constexpr int kCounterThreads = 256;

struct StepCounterArgs {
  Hyper hyper;
  const float* found_inf;
  int num_tensors;
  float* steps[kCounterBatch];
  float* mu_products[kCounterBatch];  // NAdam, else nullptr
};
static_assert(sizeof(StepCounterArgs) <= multi_tensor::kKernelParamBytes,
              "the counter kernel's arguments must fit the 4 KB parameter space of CUDA < 12.1");

// step += 1 and, for NAdam, mu_product *= mu(step), in the float arithmetic of the CPU kernel and of
// tensor_coeffs, which has already used these values. Runs after the update kernels on the same
// stream, so no block can read a counter that this kernel has advanced.
__global__ void __launch_bounds__(kCounterThreads)
    advance_step_counters_kernel(const __grid_constant__ StepCounterArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  for (int t = threadIdx.x; t < args.num_tensors; t += kCounterThreads) {
    const float step = *args.steps[t] + 1.0f;
    *args.steps[t] = step;
    if (args.mu_products[t] != nullptr)
      *args.mu_products[t] = *args.mu_products[t] * static_cast<float>(nadam_mu(args.hyper, double(step)));
  }
}

cudaError_t launch_step_counter_advance(const MultiTensorParams& mt, cudaStream_t stream) {
  if (mt.steps == nullptr) return cudaSuccess;  // SGD keeps no counter
  StepCounterArgs args{};
  args.hyper = mt.hyper;
  args.found_inf = mt.found_inf;
  const bool nadam = mt.rule == Rule::kNAdam;
  for (int64_t first = 0; first < mt.num_tensors; first += kCounterBatch) {
    args.num_tensors = static_cast<int>(std::min<int64_t>(kCounterBatch, mt.num_tensors - first));
    for (int t = 0; t < args.num_tensors; ++t) {
      args.steps[t] = mt.steps[first + t];
      args.mu_products[t] = nadam ? mt.mu_products[first + t] : nullptr;
    }
    advance_step_counters_kernel<<<1, kCounterThreads, 0, stream>>>(args);
    FASTDL_CUDA_CHECK(cudaGetLastError());
  }
  return cudaSuccess;
}

cudaError_t launch_updates(const MultiTensorParams& mt, cudaStream_t stream) {
  // fp32 states under bf16/fp16 params mean fp32 master weights (optim_ops.h's collect()).
  const bool fp32_master = mt.state_dtype == DType::kFloat32 && mt.param_dtype != DType::kFloat32;
  switch (mt.param_dtype) {
    case DType::kFloat32: return launch_update_kernels<float, float>(mt, stream);
    case DType::kFloat64: return launch_update_kernels<double, double>(mt, stream);
    case DType::kBFloat16:
      return fp32_master ? launch_update_kernels<__nv_bfloat16, float>(mt, stream)
                         : launch_update_kernels<__nv_bfloat16, __nv_bfloat16>(mt, stream);
    case DType::kFloat16:
      return fp32_master ? launch_update_kernels<__half, float>(mt, stream)
                         : launch_update_kernels<__half, __half>(mt, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_multi_tensor_step(const MultiTensorParams& mt, cudaStream_t stream) {
  if (mt.num_tensors == 0) return cudaSuccess;
  if (mt.rule == Rule::kNAdam && mt.steps != nullptr && mt.mu_products == nullptr) return cudaErrorInvalidValue;
  FASTDL_CUDA_CHECK(launch_updates(mt, stream));
  return launch_step_counter_advance(mt, stream);
}

}  // namespace fastdl::optim
