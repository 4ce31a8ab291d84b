// fp32 fused-conv2d backward (conv_bwd_kernel.cuh).
#include "conv/conv_bwd_kernel.cuh"

namespace fastdl::conv {
template cudaError_t run_conv2d_bwd<float>(const Conv2dBwdParams&, cudaStream_t);
}  // namespace fastdl::conv
