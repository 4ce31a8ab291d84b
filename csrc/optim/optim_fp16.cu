// fp16 parameters with fp16 states, or with fp32 master weights and fp32 states: the update kernels
// of every rule (see optim_kernel.cuh).
#include "optim/optim_kernel.cuh"

namespace fastdl::optim {
template cudaError_t launch_update_kernels<__half, __half>(const MultiTensorParams&, cudaStream_t);
template cudaError_t launch_update_kernels<__half, float>(const MultiTensorParams&, cudaStream_t);
}  // namespace fastdl::optim
