// Entry points of the CUDA flash-attention kernels, free of torch and of kernel code: the binding
// (flash_attn_cuda.cpp) calls launch_flash_fwd / launch_flash_bwd (flash_launch.cu), which pick the
// instantiation of run_flash_fwd / run_flash_bwd (flash_{fwd,bwd}_{fp16,bf16}.cu) for the dtype and
// the head dim rounded up to the next compiled one: 32, 64, 96, ..., 256 (FA2's set), with the extra
// columns of the tiles zero-filled in shared memory. Both run asynchronously on `stream` and return
// the first launch error; inputs must be fp16/bf16 with 16-byte aligned rows and headdim % 8 == 0.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "flash_attn/flash_attn_params.h"

namespace fastdl::flash_attn {

// Bytes of fp32 scratch the backward needs: D = rowsum(dO * O) - dlse for every (head, sequence, query
// row), laid out [nheads, batch, seqlen_q] (seqlen_q is max_seqlen_q in varlen mode).
inline int64_t flash_bwd_scratch_bytes(const BwdParams& p) {
  return p.nheads * p.batch * p.seqlen_q * static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_flash_fwd(const FwdParams& p, cudaStream_t stream);
// dsum: flash_bwd_scratch_bytes(p) of device memory, 4-byte aligned; no initial value needed.
cudaError_t launch_flash_bwd(const BwdParams& p, float* dsum, cudaStream_t stream);

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd(const FwdParams& p, cudaStream_t stream);
template <typename T, int kHeadDim>
cudaError_t run_flash_bwd(const BwdParams& p, float* dsum, cudaStream_t stream);

}  // namespace fastdl::flash_attn
