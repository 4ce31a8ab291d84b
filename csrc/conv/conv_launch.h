// Entry point of the CUDA fused-conv2d kernels, free of torch and of kernel code: the binding
// (conv_cuda.cpp) calls launch_conv2d_fwd (conv_launch.cu), which picks the instantiation of
// run_conv2d_fwd (conv_fwd_{fp16,bf16,fp32}.cu) for the input dtype. Runs asynchronously on `stream`
// and returns the launch error. bias / scale / shift are fp32 (the math dtype); fp64 is CPU-only.
#pragma once
#include <cuda_runtime_api.h>

#include "conv/conv_params.h"

namespace fastdl::conv {

cudaError_t launch_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream);

template <typename T>
cudaError_t run_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream);

}  // namespace fastdl::conv
