// CUDA registration of the paged-attention ops (schemas in csrc/ops.cpp): the op bodies of
// paged_attn_ops.h, shared with the CPU registration, run with launchers that call the kernels of
// paged_attn_launch.h on the current stream. Before the body, the attention checks what only the CUDA
// kernels need (fp16/bf16, headdim a multiple of 8, 16-byte aligned rows) and sets the device. Values
// inside cache_seqlens, block_table and slot_mapping are not checked on the GPU (that would synchronize).
// Built by setup.py only (it needs torch's CUDA headers); the kernels are also built by the CMake check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "paged_attn/paged_attn_launch.h"
#include "paged_attn/paged_attn_ops.h"

namespace fastdl::paged_attn {
namespace {

constexpr int64_t kMaxGridYZ = 65535;

void launch_attn_cuda(const Params& p_) {
  Params p = p_;
  if (p.num_splits <= 0) {
    p.num_splits = choose_num_splits(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  }
  // Split-K partials from the caching allocator on the current device (the op's CUDAGuard set it). Freed
  // on return while the kernels may still run: the allocator hands the block out again only to work
  // queued after them on this stream.
  const int64_t floats = workspace_floats(p);
  const at::DataPtr workspace =
      c10::cuda::CUDACachingAllocator::get()->allocate(static_cast<size_t>(floats) * sizeof(float));
  C10_CUDA_CHECK(launch_paged_attn(p, static_cast<float*>(workspace.get()), at::cuda::getCurrentCUDAStream()));
}

void launch_write_cuda(const CacheWriteParams& w) {
  C10_CUDA_CHECK(launch_cache_write(w, at::cuda::getCurrentCUDAStream()));
}

void launch_copy_cuda(const CopyBlocksParams& c) {
  C10_CUDA_CHECK(launch_copy_blocks(c, at::cuda::getCurrentCUDAStream()));
}

bool rows_aligned(const Tensor& x) {
  if (x.numel() == 0) return true;
  bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < x.dim(); ++dim) aligned = aligned && (x.size(dim) == 1 || x.stride(dim) % 8 == 0);
  return aligned;
}

std::tuple<Tensor, Tensor> flash_attn_with_kvcache_cuda(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const std::optional<Tensor>& k,
    const std::optional<Tensor>& v, const Tensor& cache_seqlens, const std::optional<Tensor>& block_table,
    double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<Tensor>& alibi_slopes, int64_t num_splits) {
  const char* op = "flash_attn_with_kvcache";
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": on CUDA, q must be float16 or bfloat16, got ", q.scalar_type(),
              " (float32 and float64 run on the CPU only)");
  TORCH_CHECK(q.dim() == 4 && q.size(3) % 8 == 0, op, ": on CUDA, headdim must be a multiple of 8, got shape ",
              shape_str(q.sizes()));
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && k_cache.dim() == 4 && k_cache.size(2) <= kMaxGridYZ, op,
              ": on CUDA, batch and nheads_k must be at most ", kMaxGridYZ);
  // The cache is written in place: it cannot be copied to fix its alignment, so it must be aligned.
  TORCH_CHECK(rows_aligned(k_cache) && rows_aligned(v_cache), op,
              ": on CUDA, k_cache and v_cache need 16-byte aligned rows (data pointer and strides multiples of 8 "
              "elements)");
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor qa = rows_aligned(q) ? q : q.contiguous();
  return flash_attn_with_kvcache<launch_attn_cuda, launch_write_cuda>(
      qa, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_left, window_right,
      softcap, alibi_slopes, num_splits);
}

void reshape_and_cache_cuda(const Tensor& key, const Tensor& value, const Tensor& k_cache, const Tensor& v_cache,
                            const Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(key.device());
  reshape_and_cache<launch_write_cuda>(key, value, k_cache, v_cache, slot_mapping);
}

void copy_blocks_cuda(const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_mapping) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  copy_blocks<launch_copy_cuda>(k_cache, v_cache, block_mapping);
}

}  // namespace
}  // namespace fastdl::paged_attn

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("flash_attn_with_kvcache", &fastdl::paged_attn::flash_attn_with_kvcache_cuda);
  m.impl("reshape_and_cache", &fastdl::paged_attn::reshape_and_cache_cuda);
  m.impl("copy_blocks", &fastdl::paged_attn::copy_blocks_cuda);
}
