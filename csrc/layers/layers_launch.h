// Torch-free launchers of the fused layer kernels (layers_launch.cu): each runs asynchronously on `stream`
// and returns the first launch error. Params as in layers_params.h, with device pointers.
#pragma once
#include <cuda_runtime_api.h>

#include "layers/layers_params.h"

namespace fastdl::layers {

cudaError_t launch_rms_norm_fwd(const RMSNormParams& p, cudaStream_t stream);
cudaError_t launch_rms_norm_bwd(const RMSNormBwdParams& p, cudaStream_t stream);
cudaError_t launch_rotary_emb(const RotaryParams& p, cudaStream_t stream);
cudaError_t launch_swiglu_fwd(const SwiGLUParams& p, cudaStream_t stream);
cudaError_t launch_swiglu_bwd(const SwiGLUBwdParams& p, cudaStream_t stream);

}  // namespace fastdl::layers
