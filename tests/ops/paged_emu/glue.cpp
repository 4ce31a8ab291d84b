// The CUDA paged-attention kernels built by the host compiler (host_cuda.h) behind the op body of
// csrc/paged_attn/paged_attn_ops.h, as a torch extension for tests/ops/test_paged_attn_emu.py.
#define FASTDL_PAGED_ATTN_HOST_EMULATION
#include "host_cuda.h"
// The kernels' dynamic shared memory, declared `extern __shared__ unsigned char smem_raw[]` in the kernel.
namespace fastdl::paged_attn {
alignas(16) unsigned char smem_raw[160 * 1024];
}
#include "paged_attn/paged_attn_kernel.cuh"

#include <torch/extension.h>

#include "paged_attn/paged_attn_ops.h"

namespace fastdl::paged_attn {
namespace {

int64_t emulated_sms = 4;

template <typename T, int kHeadDim>
void run(const Params& p, float* workspace) {
  static_assert(sizeof(SharedStorage<T, kHeadDim>) <= sizeof(smem_raw), "shared storage fits the buffer");
  const int64_t ntiles = num_tiles(p);
  host_cuda::launch(dim3(unsigned(ntiles * p.num_splits), unsigned(p.nheads_k), unsigned(p.batch)), kThreads,
                    [&] { attn_kernel<T, kHeadDim>(p, workspace); });
  if (p.num_splits > 1) {
    host_cuda::launch(dim3(unsigned(p.batch * p.nheads_k * ntiles), 1, 1), kThreads,
                      [&] { combine_kernel<T>(p, workspace); });
  }
}

template <typename T>
void run_dtype(const Params& p, float* workspace) {
  if (p.headdim <= 64) return run<T, 64>(p, workspace);
  if (p.headdim <= 128) return run<T, 128>(p, workspace);
  return run<T, 256>(p, workspace);
}

void launch_attn_emu(const Params& p_) {
  Params p = p_;
  TORCH_CHECK(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16, "the CUDA kernels take fp16 / bf16");
  TORCH_CHECK(p.headdim % 8 == 0, "the CUDA kernels take headdim % 8 == 0");
  if (p.num_splits <= 0) p.num_splits = choose_num_splits(p, emulated_sms);
  std::vector<float> workspace(std::max<int64_t>(workspace_floats(p), 1), std::nanf(""));
  if (p.dtype == DType::kFloat16) return run_dtype<__half>(p, workspace.data());
  return run_dtype<__nv_bfloat16>(p, workspace.data());
}

// Appends go through the CPU path's semantics (a plain row copy); the CUDA writers are not emulated.
void write_rows(const CacheWriteParams& w) {
  const int64_t es = w.element_size;
  for (int64_t n = 0; n < w.num_tokens; ++n) {
    const int64_t slot = w.slot_mapping[n];
    if (slot < 0) continue;
    const int64_t block = slot / w.block_size, row = slot % w.block_size;
    for (int64_t h = 0; h < w.nheads_k; ++h) {
      std::memcpy(static_cast<char*>(w.k_cache) + (block * w.k_block_stride + row * w.k_row_stride + h * w.k_head_stride) * es,
                  static_cast<const char*>(w.key) + (n * w.key_token_stride + h * w.key_head_stride) * es, w.headdim * es);
      std::memcpy(static_cast<char*>(w.v_cache) + (block * w.v_block_stride + row * w.v_row_stride + h * w.v_head_stride) * es,
                  static_cast<const char*>(w.value) + (n * w.value_token_stride + h * w.value_head_stride) * es,
                  w.headdim * es);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attn(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                                        const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                        double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                                        double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                        int64_t num_splits, int64_t sms) {
  emulated_sms = sms;
  return flash_attn_with_kvcache<launch_attn_emu, write_rows>(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                                              softmax_scale, causal, window_left, window_right,
                                                              softcap, alibi_slopes, num_splits);
}

}  // namespace
}  // namespace fastdl::paged_attn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attn", &fastdl::paged_attn::attn, "flash_attn_with_kvcache through the emulated CUDA kernels");
}
