// Torch-free entry points of the CUDA causal conv1d (causal_conv1d_kernel.cuh), called by the binding
// causal_conv1d_cuda.cpp. Each queues its kernels on `stream` and returns the first launch error.
// x fp32, fp16 or bf16; weight / bias in x's dtype or fp32 (the binding rejects fp64).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "causal_conv1d/causal_conv1d_params.h"

namespace fastdl::causal_conv1d {

cudaError_t launch_causal_conv1d_fwd(const ConvParams& p, cudaStream_t stream);

// scratch: causal_conv1d_bwd_scratch_floats(p) floats of device memory, no initial value needed.
int64_t causal_conv1d_bwd_scratch_floats(const ConvBwdParams& p);
cudaError_t launch_causal_conv1d_bwd(const ConvBwdParams& p, float* scratch, cudaStream_t stream);

cudaError_t launch_causal_conv1d_update(const ConvUpdateParams& p, cudaStream_t stream);

}  // namespace fastdl::causal_conv1d
