// fp16 fused-conv2d forward (conv_kernel.cuh).
#include "conv/conv_kernel.cuh"

namespace fastdl::conv {
template cudaError_t run_conv2d_fwd<__half>(const Conv2dParams&, cudaStream_t);
}  // namespace fastdl::conv
