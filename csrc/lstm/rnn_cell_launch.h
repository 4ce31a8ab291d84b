// Torch-free entry points of the CUDA fused recurrent cells (rnn_cell_kernel.cuh), called by the binding
// lstm_cuda.cpp. fp32 or fp64 (p.dtype); bf16 is converted to fp32 at the op boundary, as on the CPU.
#pragma once
#include <cuda_runtime_api.h>

#include "lstm/lstm_params.h"

namespace fastdl::rnn {

cudaError_t launch_rnn_cell_fwd(const CellFwdParams& p, cudaStream_t stream);
cudaError_t launch_rnn_cell_bwd(const CellBwdParams& p, cudaStream_t stream);

}  // namespace fastdl::rnn
