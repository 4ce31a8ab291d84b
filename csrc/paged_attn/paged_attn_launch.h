// Entry points of the CUDA paged-attention kernels, free of torch and of kernel code: the binding
// (paged_attn_cuda.cpp) calls these (paged_attn_launch.cu), which pick the instantiation of run_paged_attn
// (paged_attn_{fp16,bf16}.cu) for the dtype and the head dim rounded up to 64, 128 or 256. Everything runs
// asynchronously on `stream` and returns the first launch error. Inputs: fp16/bf16, headdim % 8 == 0, rows
// 16-byte aligned (q and the caches).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "paged_attn/paged_attn_params.h"

namespace fastdl::paged_attn {

constexpr int kMaxRows = 16;  // query rows per CTA: a GQA group of up to 16 heads at one position

inline int64_t num_tiles(const Params& p) {
  return (p.seqlen_q * (p.nheads / p.nheads_k) + kMaxRows - 1) / kMaxRows;
}

// Split-K workspace (p.num_splits must be set): per (sequence, kv-head, tile, split), kMaxRows (max, sum)
// pairs, then kMaxRows x headdim unnormalised outputs, all fp32.
inline int64_t workspace_floats(const Params& p) {
  if (p.num_splits <= 1) return 0;
  return p.batch * p.nheads_k * num_tiles(p) * p.num_splits * kMaxRows * (p.headdim + 2);
}

// Splits for a GPU of num_sms multiprocessors: about 4 CTAs per SM, each split at least 256 keys of the
// longest sequence the table allows (the real lengths are on the device; splits past a sequence's end
// exit at once).
inline int64_t choose_num_splits(const Params& p, int64_t num_sms) {
  const int64_t ctas = p.batch * p.nheads_k * num_tiles(p);
  const int64_t capacity = p.max_blocks_per_seq * p.block_size;
  int64_t splits = (4 * num_sms + ctas - 1) / (ctas > 0 ? ctas : 1);
  splits = splits < capacity / 256 ? splits : capacity / 256;
  return splits < 1 ? 1 : (splits > 64 ? 64 : splits);
}

// workspace: workspace_floats(p) floats of device memory (none when p.num_splits <= 1).
cudaError_t launch_paged_attn(const Params& p, float* workspace, cudaStream_t stream);
cudaError_t launch_cache_write(const CacheWriteParams& w, cudaStream_t stream);
cudaError_t launch_copy_blocks(const CopyBlocksParams& c, cudaStream_t stream);

template <typename T, int kHeadDim>
cudaError_t run_paged_attn(const Params& p, float* workspace, cudaStream_t stream);

}  // namespace fastdl::paged_attn
