// fp32 parameters and states: the update kernels of every rule (see optim_kernel.cuh).
#include "optim/optim_kernel.cuh"

namespace fastdl::optim {
template cudaError_t launch_update_kernels<float, float>(const MultiTensorParams&, cudaStream_t);
}  // namespace fastdl::optim
