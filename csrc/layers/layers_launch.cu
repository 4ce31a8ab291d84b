// Launchers of the fused layer kernels (layers_kernel.cuh) for fp32, fp64, bf16 and fp16: small memory-bound
// kernels, so one file holds every dtype.
#include "layers/layers_kernel.cuh"
#include "layers/layers_launch.h"

namespace fastdl::layers {
namespace {

template <typename Fn>
cudaError_t dispatch_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat16: return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

// Grid-stride kernels: enough blocks to fill an H100/H200 (132 SMs x 16 blocks of 256), no more.
constexpr int64_t kMaxElementwiseBlocks = 132 * 16;

unsigned elementwise_blocks(int64_t n) {
  const int64_t blocks = cuda::ceil_div<int64_t>(n, kThreads);
  return static_cast<unsigned>(blocks < kMaxElementwiseBlocks ? (blocks > 0 ? blocks : 1) : kMaxElementwiseBlocks);
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(cuda::ceil_div<int64_t>(rows, kRowsPerBlock)); }

}  // namespace

cudaError_t launch_rms_norm_fwd(const RMSNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    rms_norm_fwd_kernel<decltype(t)><<<row_blocks(p.rows), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_rms_norm_bwd(const RMSNormBwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    rms_norm_bwd_dx_kernel<T><<<row_blocks(p.rows), kThreads, 0, stream>>>(p);
    FASTDL_CUDA_CHECK(cudaGetLastError());
    if (p.weight == nullptr) return cudaSuccess;
    const int64_t blocks = rms_norm_row_blocks(p.rows);
    const int64_t rows_per_block = cuda::ceil_div<int64_t>(p.rows, blocks);
    const unsigned col_tiles = static_cast<unsigned>(cuda::ceil_div<int64_t>(p.cols, kThreads));
    rms_norm_bwd_dweight_partial_kernel<T>
        <<<dim3(col_tiles, static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(p, rows_per_block);
    FASTDL_CUDA_CHECK(cudaGetLastError());
    rms_norm_bwd_dweight_sum_kernel<T><<<col_tiles, kThreads, 0, stream>>>(p, blocks);
    return cudaGetLastError();
  });
}

cudaError_t launch_rotary_emb(const RotaryParams& p, cudaStream_t stream) {
  const int64_t n = p.batch * p.seqlen * p.nheads * (p.headdim / 2);
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    rotary_emb_kernel<decltype(t)><<<elementwise_blocks(n), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_swiglu_fwd(const SwiGLUParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    swiglu_fwd_kernel<decltype(t)><<<elementwise_blocks(n), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_swiglu_bwd(const SwiGLUBwdParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    swiglu_bwd_kernel<decltype(t)><<<elementwise_blocks(n), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastdl::layers
