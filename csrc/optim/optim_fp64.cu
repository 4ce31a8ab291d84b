// fp64 parameters and states, with fp64 math: the update kernels of every rule (see optim_kernel.cuh).
#include "optim/optim_kernel.cuh"

namespace fastdl::optim {
template cudaError_t launch_update_kernels<double, double>(const MultiTensorParams&, cudaStream_t);
}  // namespace fastdl::optim
