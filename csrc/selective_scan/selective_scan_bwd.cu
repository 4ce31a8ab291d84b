// The CUDA selective scan backward (selective_scan_kernel.cuh) for fp32, fp16 and bf16 inputs.
#include "selective_scan/selective_scan_kernel.cuh"
#include "selective_scan/selective_scan_launch.h"

namespace fastdl::selective_scan {

int64_t selective_scan_bwd_scratch_floats(const ScanBwdParams& p) { return scan_bwd_scratch_floats(p); }

cudaError_t launch_selective_scan_bwd(const ScanBwdParams& p, float* scratch, cudaStream_t stream) {
  if (p.weight_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (p.input_dtype) {
    case DType::kFloat32: return launch_scan_bwd<float>(p, scratch, stream);
    case DType::kFloat16: return launch_scan_bwd<__half>(p, scratch, stream);
    case DType::kBFloat16: return launch_scan_bwd<__nv_bfloat16>(p, scratch, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastdl::selective_scan
