// Dispatch of the CUDA paged-attention kernels (paged_attn_launch.h), and the cache writers: reshape_and_cache
// (and flash_attn_with_kvcache's append) and copy_blocks, plain copies of headdim-long rows in the widest
// word that divides a row (16 bytes for 8 fp16/bf16 elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

#include "common/cuda_utils.cuh"
#include "paged_attn/paged_attn_launch.h"

namespace fastdl::paged_attn {

namespace {

// One CTA per token, threads over (head, element); Vec is the widest word dividing the row's bytes.
template <typename Vec>
__global__ void write_kernel(const CacheWriteParams w) {
  const int64_t n = blockIdx.x;
  const int64_t slot = w.slot_mapping[n];
  if (slot < 0) return;
  const int64_t block = slot / w.block_size, row = slot % w.block_size;
  const int64_t es = w.element_size, per_row = w.headdim * es / int64_t(sizeof(Vec));
  for (int64_t x = threadIdx.x; x < w.nheads_k * per_row; x += blockDim.x) {
    const int64_t h = x / per_row, c = x % per_row;
    const auto* key = reinterpret_cast<const Vec*>(static_cast<const char*>(w.key) +
                                                   (n * w.key_token_stride + h * w.key_head_stride) * es);
    const auto* value = reinterpret_cast<const Vec*>(static_cast<const char*>(w.value) +
                                                     (n * w.value_token_stride + h * w.value_head_stride) * es);
    auto* kc = reinterpret_cast<Vec*>(static_cast<char*>(w.k_cache) +
                                      (block * w.k_block_stride + row * w.k_row_stride + h * w.k_head_stride) * es);
    auto* vc = reinterpret_cast<Vec*>(static_cast<char*>(w.v_cache) +
                                      (block * w.v_block_stride + row * w.v_row_stride + h * w.v_head_stride) * es);
    kc[c] = key[c];
    vc[c] = value[c];
  }
}

// One CTA per (pair, cache): threads over (row, head, element).
template <typename Vec>
__global__ void copy_kernel(const CopyBlocksParams c) {
  const int64_t pair = blockIdx.x;
  const bool is_v = blockIdx.y == 1;
  const int64_t src = c.block_mapping[2 * pair], dst = c.block_mapping[2 * pair + 1];
  if (src == dst) return;
  char* base = static_cast<char*>(is_v ? c.v_cache : c.k_cache);
  const int64_t block_stride = is_v ? c.v_block_stride : c.k_block_stride;
  const int64_t row_stride = is_v ? c.v_row_stride : c.k_row_stride;
  const int64_t head_stride = is_v ? c.v_head_stride : c.k_head_stride;
  const int64_t es = c.element_size, per_row = c.headdim * es / int64_t(sizeof(Vec));
  for (int64_t x = threadIdx.x; x < c.block_size * c.nheads_k * per_row; x += blockDim.x) {
    const int64_t e = x % per_row, h = x / per_row % c.nheads_k, r = x / per_row / c.nheads_k;
    const int64_t off = r * row_stride + h * head_stride;
    reinterpret_cast<Vec*>(base + (dst * block_stride + off) * es)[e] =
        reinterpret_cast<const Vec*>(base + (src * block_stride + off) * es)[e];
  }
}

// The widest of 16, 8, 4, 2, 1 bytes dividing the row and every stride and pointer (in bytes).
int word_bytes(int64_t row_bytes, std::initializer_list<int64_t> byte_offsets) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = row_bytes % w == 0;
    for (int64_t off : byte_offsets) ok = ok && off % w == 0;
    if (ok) return w;
  }
  return 1;
}

template <typename Vec>
cudaError_t write_with(const CacheWriteParams& w, cudaStream_t stream) {
  write_kernel<Vec><<<static_cast<unsigned>(w.num_tokens), 128, 0, stream>>>(w);
  return cudaGetLastError();
}

template <typename Vec>
cudaError_t copy_with(const CopyBlocksParams& c, cudaStream_t stream) {
  copy_kernel<Vec><<<dim3(static_cast<unsigned>(c.num_pairs), 2), 256, 0, stream>>>(c);
  return cudaGetLastError();
}

template <typename Params_>
cudaError_t dispatch_word(int bytes, const Params_& params, cudaStream_t stream,
                          cudaError_t (*const fns[5])(const Params_&, cudaStream_t)) {
  switch (bytes) {
    case 16: return fns[0](params, stream);
    case 8: return fns[1](params, stream);
    case 4: return fns[2](params, stream);
    case 2: return fns[3](params, stream);
    default: return fns[4](params, stream);
  }
}

int64_t address(const void* ptr) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr)); }

}  // namespace

cudaError_t launch_paged_attn(const Params& p, float* workspace, cudaStream_t stream) {
  const int64_t d = p.headdim;
  if (p.dtype == DType::kFloat16) {
    if (d <= 64) return run_paged_attn<__half, 64>(p, workspace, stream);
    if (d <= 128) return run_paged_attn<__half, 128>(p, workspace, stream);
    return run_paged_attn<__half, 256>(p, workspace, stream);
  }
  if (p.dtype == DType::kBFloat16) {
    if (d <= 64) return run_paged_attn<__nv_bfloat16, 64>(p, workspace, stream);
    if (d <= 128) return run_paged_attn<__nv_bfloat16, 128>(p, workspace, stream);
    return run_paged_attn<__nv_bfloat16, 256>(p, workspace, stream);
  }
  return cudaErrorInvalidValue;  // fp32 / fp64 run on the CPU only; the binding says so first
}

cudaError_t launch_cache_write(const CacheWriteParams& w, cudaStream_t stream) {
  if (w.num_tokens == 0) return cudaSuccess;
  const int64_t es = w.element_size;
  const int bytes = word_bytes(w.headdim * es, {address(w.key), address(w.value), address(w.k_cache),
                                                address(w.v_cache), w.key_token_stride * es, w.key_head_stride * es,
                                                w.value_token_stride * es, w.value_head_stride * es,
                                                w.k_block_stride * es, w.k_row_stride * es, w.k_head_stride * es,
                                                w.v_block_stride * es, w.v_row_stride * es, w.v_head_stride * es});
  static cudaError_t (*const fns[5])(const CacheWriteParams&, cudaStream_t) = {
      write_with<uint4>, write_with<uint2>, write_with<uint32_t>, write_with<uint16_t>, write_with<uint8_t>};
  return dispatch_word(bytes, w, stream, fns);
}

cudaError_t launch_copy_blocks(const CopyBlocksParams& c, cudaStream_t stream) {
  if (c.num_pairs == 0) return cudaSuccess;
  const int64_t es = c.element_size;
  const int bytes = word_bytes(c.headdim * es, {address(c.k_cache), address(c.v_cache), c.k_block_stride * es,
                                                c.k_row_stride * es, c.k_head_stride * es, c.v_block_stride * es,
                                                c.v_row_stride * es, c.v_head_stride * es});
  static cudaError_t (*const fns[5])(const CopyBlocksParams&, cudaStream_t) = {
      copy_with<uint4>, copy_with<uint2>, copy_with<uint32_t>, copy_with<uint16_t>, copy_with<uint8_t>};
  return dispatch_word(bytes, c, stream, fns);
}

}  // namespace fastdl::paged_attn
