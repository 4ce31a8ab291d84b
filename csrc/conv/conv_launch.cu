// Dtype dispatch of the CUDA fused-conv2d forward and backward (conv_launch.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv/conv_launch.h"

namespace fastdl::conv {

cudaError_t launch_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream) {
  switch (p.input_dtype) {
    case DType::kFloat16: return run_conv2d_fwd<__half>(p, stream);
    case DType::kBFloat16: return run_conv2d_fwd<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return run_conv2d_fwd<float>(p, stream);
    default: return cudaErrorInvalidValue;  // fp64: CPU only (the binding rejects it first)
  }
}

cudaError_t launch_conv2d_bwd(const Conv2dBwdParams& p, cudaStream_t stream) {
  switch (p.input_dtype) {
    case DType::kFloat16: return run_conv2d_bwd<__half>(p, stream);
    case DType::kBFloat16: return run_conv2d_bwd<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return run_conv2d_bwd<float>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastdl::conv
