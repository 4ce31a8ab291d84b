// CUDA registration of the flash-attention ops (schemas in csrc/ops.cpp): the op bodies of
// flash_attn_ops.h, shared with the CPU registration, run with launchers that call the kernels of
// flash_launch.h on the current stream. Before the body, each op checks what only the CUDA kernels
// need (fp16/bf16, headdim a multiple of 8, sm_80+, 16-byte aligned rows) and sets the device.
// This file is built by setup.py only (it needs torch's CUDA headers); the kernels are also built by
// the CMake compile check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "flash_attn/flash_attn_ops.h"
#include "flash_attn/flash_launch.h"

namespace fastdl::flash_attn {
namespace {

// The kernels index rows with int and launch (query blocks, heads, batch) grids.
constexpr int64_t kMaxCudaSeqlen = int64_t(1) << 30;
constexpr int64_t kMaxGridYZ = 65535;

void launch_fwd_cuda(const FwdParams& p) { C10_CUDA_CHECK(launch_flash_fwd(p, at::cuda::getCurrentCUDAStream())); }

void launch_bwd_cuda(const BwdParams& p) {
  // D = rowsum(dO * O) for every query row, from the caching allocator on the current device (the
  // op's CUDAGuard set it). Freed on return while the kernels may still run: the allocator hands the
  // block out again only to work queued after them on this stream.
  const at::DataPtr dsum = c10::cuda::CUDACachingAllocator::get()->allocate(flash_bwd_scratch_bytes(p));
  C10_CUDA_CHECK(launch_flash_bwd(p, static_cast<float*>(dsum.get()), at::cuda::getCurrentCUDAStream()));
}

// What the CUDA kernels need beyond the shared checks of check_qkv (which the caller runs first).
void check_cuda(const char* op, const Tensor& q, int64_t batch, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": on CUDA, q must be float16 or bfloat16, got ", q.scalar_type(),
              " (float32 and float64 run on the CPU only)");
  const int64_t headdim = q.size(-1);
  TORCH_CHECK(headdim % 8 == 0, op, ": on CUDA, headdim must be a multiple of 8 (at most 256), got ", headdim,
              "; pad q, k and v with zeros to the next multiple of 8");
  const int64_t nheads = q.size(-2);
  TORCH_CHECK(nheads <= kMaxGridYZ && batch <= kMaxGridYZ, op, ": on CUDA, nheads and batch must be at most ",
              kMaxGridYZ, ", got nheads ", nheads, " and batch ", batch);
  TORCH_CHECK(max_seqlen_q < kMaxCudaSeqlen && max_seqlen_k < kMaxCudaSeqlen, op,
              ": on CUDA, sequences must be shorter than 2^30, got seqlen_q ", max_seqlen_q, " and seqlen_k ",
              max_seqlen_k);
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(props->major >= 8, op, ": needs a GPU of compute capability 8.0 or newer (bf16/fp16 mma.sync, "
              "cp.async), got ", props->major, ".", props->minor, " (", props->name, ")");
}

// The kernels move rows 16 bytes (8 elements) at a time: a tensor whose data pointer or row, head or
// batch stride is not a multiple of that is copied (contiguous copies are aligned).
Tensor aligned_rows(const Tensor& x) {
  if (x.numel() == 0) return x;
  bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < x.dim(); ++dim) aligned = aligned && (x.size(dim) == 1 || x.stride(dim) % 8 == 0);
  return aligned ? x : x.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

// The CUDA implementations (external linkage, so that other translation units can call them directly).

std::tuple<Tensor, Tensor> flash_attn_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, double softmax_scale,
                                               bool causal, int64_t window_left, int64_t window_right, double softcap,
                                               const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_fwd";
  check_qkv(op, q, k, v, 4);
  check_cuda(op, q, q.size(0), q.size(1), k.size(1));
  const c10::cuda::CUDAGuard guard(q.device());
  return flash_attn_fwd<launch_fwd_cuda>(aligned_rows(q), aligned_rows(k), aligned_rows(v), softmax_scale, causal,
                                         window_left, window_right, softcap, alibi_slopes);
}

std::tuple<Tensor, Tensor> flash_attn_varlen_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                      const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                                      bool causal, int64_t window_left, int64_t window_right,
                                                      double softcap, const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_varlen_fwd";
  check_qkv(op, q, k, v, 3);
  check_cuda(op, q, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(q.device());
  return flash_attn_varlen_fwd<launch_fwd_cuda>(aligned_rows(q), aligned_rows(k), aligned_rows(v), cu_seqlens_q,
                                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                                                window_left, window_right, softcap, alibi_slopes);
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& out, const Tensor& softmax_lse,
                                                       const std::optional<Tensor>& dsoftmax_lse, double softmax_scale,
                                                       bool causal, int64_t window_left, int64_t window_right,
                                                       double softcap, const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_bwd";
  check_qkv(op, q, k, v, 4);
  check_cuda(op, q, q.size(0), q.size(1), k.size(1));
  const c10::cuda::CUDAGuard guard(q.device());
  return flash_attn_bwd<launch_bwd_cuda>(aligned_rows(dout), aligned_rows(q), aligned_rows(k), aligned_rows(v),
                                         aligned_rows(out), softmax_lse, dsoftmax_lse, softmax_scale, causal,
                                         window_left, window_right, softcap, alibi_slopes);
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_varlen_bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const std::optional<Tensor>& dsoftmax_lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<Tensor>& alibi_slopes) {
  const char* op = "flash_attn_varlen_bwd";
  check_qkv(op, q, k, v, 3);
  check_cuda(op, q, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(q.device());
  return flash_attn_varlen_bwd<launch_bwd_cuda>(aligned_rows(dout), aligned_rows(q), aligned_rows(k),
                                                aligned_rows(v), aligned_rows(out), softmax_lse, dsoftmax_lse,
                                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                                causal, window_left, window_right, softcap, alibi_slopes);
}

}  // namespace fastdl::flash_attn

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("flash_attn_fwd", &fastdl::flash_attn::flash_attn_fwd_cuda);
  m.impl("flash_attn_varlen_fwd", &fastdl::flash_attn::flash_attn_varlen_fwd_cuda);
  m.impl("flash_attn_bwd", &fastdl::flash_attn::flash_attn_bwd_cuda);
  m.impl("flash_attn_varlen_bwd", &fastdl::flash_attn::flash_attn_varlen_bwd_cuda);
}
