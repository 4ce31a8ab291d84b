// The CUDA selective scan forward and decoding update (selective_scan_kernel.cuh) for fp32, fp16 and bf16
// inputs; the backward is in selective_scan_bwd.cu so that the two compile in parallel.
#include "selective_scan/selective_scan_kernel.cuh"
#include "selective_scan/selective_scan_launch.h"

namespace fastdl::selective_scan {

cudaError_t launch_selective_scan_fwd(const ScanParams& p, cudaStream_t stream) {
  if (p.weight_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (p.input_dtype) {
    case DType::kFloat32: return launch_scan_fwd<float>(p, stream);
    case DType::kFloat16: return launch_scan_fwd<__half>(p, stream);
    case DType::kBFloat16: return launch_scan_fwd<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The state is fp32 or in the input dtype (mamba-ssm keeps it in the input dtype when decoding).
cudaError_t launch_selective_state_update(const StateUpdateParams& p, cudaStream_t stream) {
  if (p.weight_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  const bool fp32_state = p.state_dtype == DType::kFloat32;
  if (!fp32_state && p.state_dtype != p.input_dtype) return cudaErrorInvalidValue;
  switch (p.input_dtype) {
    case DType::kFloat32: return launch_state_update<float, float>(p, stream);
    case DType::kFloat16:
      return fp32_state ? launch_state_update<__half, float>(p, stream)
                        : launch_state_update<__half, __half>(p, stream);
    case DType::kBFloat16:
      return fp32_state ? launch_state_update<__nv_bfloat16, float>(p, stream)
                        : launch_state_update<__nv_bfloat16, __nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastdl::selective_scan
