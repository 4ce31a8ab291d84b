// Torch-free entry points of the CUDA selective scan (selective_scan_kernel.cuh), called by the binding
// selective_scan_cuda.cpp. Each queues its kernels on `stream` and returns the first launch error.
// Inputs fp32, fp16 or bf16; parameters and states fp32 (the binding rejects fp64).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "selective_scan/selective_scan_params.h"

namespace fastdl::selective_scan {

cudaError_t launch_selective_scan_fwd(const ScanParams& p, cudaStream_t stream);

// scratch: selective_scan_bwd_scratch_floats(p) floats of device memory, no initial value needed.
int64_t selective_scan_bwd_scratch_floats(const ScanBwdParams& p);
cudaError_t launch_selective_scan_bwd(const ScanBwdParams& p, float* scratch, cudaStream_t stream);

cudaError_t launch_selective_state_update(const StateUpdateParams& p, cudaStream_t stream);

}  // namespace fastdl::selective_scan
