// bf16 parameters with bf16 states, or with fp32 master weights and fp32 states: the update kernels
// of every rule (see optim_kernel.cuh).
#include "optim/optim_kernel.cuh"

namespace fastdl::optim {
template cudaError_t launch_update_kernels<__nv_bfloat16, __nv_bfloat16>(const MultiTensorParams&, cudaStream_t);
template cudaError_t launch_update_kernels<__nv_bfloat16, float>(const MultiTensorParams&, cudaStream_t);
}  // namespace fastdl::optim
