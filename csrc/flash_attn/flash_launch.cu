// Entry points of the CUDA flash attention (declared in flash_launch.h): the dtype and the head dim,
// rounded up to a compiled one, pick the instantiation. Kernel code lives in flash_{fwd,bwd}_kernel.cuh
// and is compiled in flash_{fwd,bwd}_{fp16,bf16}.cu, so this file only dispatches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "flash_attn/flash_launch.h"

namespace fastdl::flash_attn {
namespace {

// Calls fn(std::integral_constant<int, D>{}) for the smallest compiled head dim D >= headdim.
template <typename Fn>
cudaError_t headdim_switch(int64_t headdim, Fn&& fn) {
  if (headdim <= 0 || headdim % 8 != 0) return cudaErrorInvalidValue;
  if (headdim <= 32) return fn(std::integral_constant<int, 32>{});
  if (headdim <= 64) return fn(std::integral_constant<int, 64>{});
  if (headdim <= 96) return fn(std::integral_constant<int, 96>{});
  if (headdim <= 128) return fn(std::integral_constant<int, 128>{});
  if (headdim <= 160) return fn(std::integral_constant<int, 160>{});
  if (headdim <= 192) return fn(std::integral_constant<int, 192>{});
  if (headdim <= 224) return fn(std::integral_constant<int, 224>{});
  if (headdim <= 256) return fn(std::integral_constant<int, 256>{});
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t fwd(const FwdParams& p, cudaStream_t stream) {
  return headdim_switch(p.headdim, [&](auto d) { return run_flash_fwd<T, decltype(d)::value>(p, stream); });
}

template <typename T>
cudaError_t bwd(const BwdParams& p, float* dsum, cudaStream_t stream) {
  return headdim_switch(p.headdim, [&](auto d) { return run_flash_bwd<T, decltype(d)::value>(p, dsum, stream); });
}

}  // namespace

cudaError_t launch_flash_fwd(const FwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16: return fwd<__half>(p, stream);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;  // fp32 / fp64 run on the CPU only
  }
}

cudaError_t launch_flash_bwd(const BwdParams& p, float* dsum, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16: return bwd<__half>(p, dsum, stream);
    case DType::kBFloat16: return bwd<__nv_bfloat16>(p, dsum, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastdl::flash_attn
