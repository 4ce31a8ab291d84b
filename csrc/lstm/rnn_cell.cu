// The CUDA fused recurrent cells (rnn_cell_kernel.cuh) in fp32 and fp64 (fp64 for gradcheck).
#include "lstm/rnn_cell_kernel.cuh"
#include "lstm/rnn_cell_launch.h"

namespace fastdl::rnn {

cudaError_t launch_rnn_cell_fwd(const CellFwdParams& p, cudaStream_t stream) {
  return launch_rnn_cell_fwd_copying(p, CellFwdCopies{}, stream);
}

cudaError_t launch_rnn_cell_fwd_copying(const CellFwdParams& p, const CellFwdCopies& copies, cudaStream_t stream) {
  return p.dtype == DType::kFloat64 ? launch_cell_fwd<double>(p, copies, stream)
                                    : launch_cell_fwd<float>(p, copies, stream);
}

cudaError_t launch_rnn_cell_bwd(const CellBwdParams& p, cudaStream_t stream) {
  return launch_rnn_cell_bwd_adding(p, nullptr, 0, stream);
}

cudaError_t launch_rnn_cell_bwd_adding(const CellBwdParams& p, const void* grad_h_add, int64_t grad_h_add_stride,
                                       cudaStream_t stream) {
  return p.dtype == DType::kFloat64 ? launch_cell_bwd<double>(p, grad_h_add, grad_h_add_stride, stream)
                                    : launch_cell_bwd<float>(p, grad_h_add, grad_h_add_stride, stream);
}

}  // namespace fastdl::rnn
