// CUDA registration of the fused layer ops (schemas in csrc/ops.cpp): the op bodies of layers_ops.h, shared
// with the CPU registration, on the device of their first input and the current stream, with the launchers
// of layers_launch.h. Built by setup.py only (it needs torch's CUDA headers); the kernels are also built by
// the CMake compile check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "layers/layers_launch.h"
#include "layers/layers_ops.h"

namespace fastdl::layers {
namespace {

void rms_norm_fwd_cuda(const RMSNormParams& p) {
  C10_CUDA_CHECK(launch_rms_norm_fwd(p, at::cuda::getCurrentCUDAStream()));
}
void rms_norm_bwd_cuda(const RMSNormBwdParams& p) {
  C10_CUDA_CHECK(launch_rms_norm_bwd(p, at::cuda::getCurrentCUDAStream()));
}
void rotary_emb_cuda(const RotaryParams& p) { C10_CUDA_CHECK(launch_rotary_emb(p, at::cuda::getCurrentCUDAStream())); }
void swiglu_fwd_cuda(const SwiGLUParams& p) { C10_CUDA_CHECK(launch_swiglu_fwd(p, at::cuda::getCurrentCUDAStream())); }
void swiglu_bwd_cuda(const SwiGLUBwdParams& p) {
  C10_CUDA_CHECK(launch_swiglu_bwd(p, at::cuda::getCurrentCUDAStream()));
}

// The bodies allocate on the inputs' device; the guard makes it current so the kernels run there too.
std::tuple<Tensor, Tensor> rms_norm_fwd_op(const Tensor& x, c10::IntArrayRef normalized_shape,
                                           const OptTensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return rms_norm_fwd<rms_norm_fwd_cuda>(x, normalized_shape, weight, eps);
}
std::tuple<Tensor, Tensor> rms_norm_bwd_op(const Tensor& dout, const Tensor& x, c10::IntArrayRef normalized_shape,
                                           const OptTensor& weight, const Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  return rms_norm_bwd<rms_norm_bwd_cuda>(dout, x, normalized_shape, weight, rstd);
}
Tensor rotary_emb_op(const Tensor& x, const Tensor& cos, const Tensor& sin, bool conjugate) {
  const c10::cuda::CUDAGuard guard(x.device());
  return rotary_emb<rotary_emb_cuda>(x, cos, sin, conjugate);
}
Tensor swiglu_fwd_op(const Tensor& gate, const Tensor& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  return swiglu_fwd<swiglu_fwd_cuda>(gate, up);
}
std::tuple<Tensor, Tensor> swiglu_bwd_op(const Tensor& dout, const Tensor& gate, const Tensor& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  return swiglu_bwd<swiglu_bwd_cuda>(dout, gate, up);
}

}  // namespace
}  // namespace fastdl::layers

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("rms_norm_fwd", &fastdl::layers::rms_norm_fwd_op);
  m.impl("rms_norm_bwd", &fastdl::layers::rms_norm_bwd_op);
  m.impl("rotary_emb", &fastdl::layers::rotary_emb_op);
  m.impl("swiglu_fwd", &fastdl::layers::swiglu_fwd_op);
  m.impl("swiglu_bwd", &fastdl::layers::swiglu_bwd_op);
}
