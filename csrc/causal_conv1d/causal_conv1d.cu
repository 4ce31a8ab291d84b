// The CUDA causal conv1d kernels (causal_conv1d_kernel.cuh) for each (x, weight) dtype pair: fp32 / fp32,
// and fp16 or bf16 x with weights in x's dtype or fp32. Small kernels: one file compiles in seconds.
#include "causal_conv1d/causal_conv1d_kernel.cuh"
#include "causal_conv1d/causal_conv1d_launch.h"

namespace fastdl::causal_conv1d {
namespace {

// Calls F<T, W>::run(args...) for the params' dtype pair.
template <template <typename, typename> class F, typename P, typename... Args>
cudaError_t dispatch(const P& p, Args... args) {
  const bool fp32_weight = p.weight_dtype == DType::kFloat32;
  switch (p.input_dtype) {
    case DType::kFloat32:
      return fp32_weight ? F<float, float>::run(p, args...) : cudaErrorInvalidValue;
    case DType::kFloat16:
      if (!fp32_weight && p.weight_dtype != DType::kFloat16) return cudaErrorInvalidValue;
      return fp32_weight ? F<__half, float>::run(p, args...) : F<__half, __half>::run(p, args...);
    case DType::kBFloat16:
      if (!fp32_weight && p.weight_dtype != DType::kBFloat16) return cudaErrorInvalidValue;
      return fp32_weight ? F<__nv_bfloat16, float>::run(p, args...)
                         : F<__nv_bfloat16, __nv_bfloat16>::run(p, args...);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename W>
struct Fwd {
  static cudaError_t run(const ConvParams& p, cudaStream_t s) { return launch_conv_fwd<T, W>(p, s); }
};
template <typename T, typename W>
struct Bwd {
  static cudaError_t run(const ConvBwdParams& p, float* scratch, cudaStream_t s) {
    return launch_conv_bwd<T, W>(p, scratch, s);
  }
};
template <typename T, typename W>
struct Update {
  static cudaError_t run(const ConvUpdateParams& p, cudaStream_t s) { return launch_conv_update<T, W>(p, s); }
};

}  // namespace

cudaError_t launch_causal_conv1d_fwd(const ConvParams& p, cudaStream_t stream) { return dispatch<Fwd>(p, stream); }

int64_t causal_conv1d_bwd_scratch_floats(const ConvBwdParams& p) { return conv_bwd_scratch_floats(p); }

cudaError_t launch_causal_conv1d_bwd(const ConvBwdParams& p, float* scratch, cudaStream_t stream) {
  return dispatch<Bwd>(p, scratch, stream);
}

cudaError_t launch_causal_conv1d_update(const ConvUpdateParams& p, cudaStream_t stream) {
  return dispatch<Update>(p, stream);
}

}  // namespace fastdl::causal_conv1d
