// Torch-free entry points of the CUDA fused recurrent cells (rnn_cell_kernel.cuh), called by the binding
// lstm_cuda.cpp. fp32 or fp64 (p.dtype); bf16 is converted to fp32 at the op boundary, as on the CPU.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "lstm/lstm_params.h"

namespace fastdl::rnn {

// Copies the layer's forward makes of what the cell reads and writes, done by the cell kernel itself so
// that a step is two launches (recurrent GEMM, cell) instead of six: into the workspace h_{t-1}, c_{t-1}
// and c_t, and h_t into the layer's output rows. Each may be nullptr; h_prev_copy needs the state width
// to be H (no projection).
struct CellFwdCopies {
  void* h_prev = nullptr;  // [batch, H] <- h_{t-1} (read from p.h_prev)
  int64_t h_prev_stride = 0;
  void* c_prev = nullptr;  // [batch, H] <- c_{t-1}
  int64_t c_prev_stride = 0;
  void* c_out = nullptr;   // [batch, H] <- c_t
  int64_t c_out_stride = 0;
  void* h_out = nullptr;   // [batch, H] <- h_t
  int64_t h_out_stride = 0;
};

cudaError_t launch_rnn_cell_fwd(const CellFwdParams& p, cudaStream_t stream);
cudaError_t launch_rnn_cell_fwd_copying(const CellFwdParams& p, const CellFwdCopies& copies, cudaStream_t stream);
cudaError_t launch_rnn_cell_bwd(const CellBwdParams& p, cudaStream_t stream);
// The same, with grad_h_add (nullptr, or [batch, H] with that row stride) added to p.grad_h as it is read: the
// layer's backward passes the step's d output so that no separate add runs. Where the cell writes
// grad_h_prev over grad_h (GRU), it writes z * (grad_h + grad_h_add).
cudaError_t launch_rnn_cell_bwd_adding(const CellBwdParams& p, const void* grad_h_add, int64_t grad_h_add_stride,
                                       cudaStream_t stream);

}  // namespace fastdl::rnn
