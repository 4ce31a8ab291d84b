// Every fastdl op schema, registered once (cf. pytorch/extension-cpp). Implementations register
// beside their kernels: TORCH_LIBRARY_IMPL(fastdl, CPU, ...) in <op>_cpu.cpp and
// TORCH_LIBRARY_IMPL(fastdl, CUDA, ...) in <op>_cuda.cpp. Python adds fake (meta) kernels and
// autograd in fastdl/ops/.
//
// Also the pybind11 module fastdl._C, which only reports how the extension was built.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastdl, m) {
  // ---- fused multi-tensor optimizers (csrc/optim/) ------------------------------------------------
  // One call updates every tensor of a param group in place. Lists of optional state are empty when
  // the options do not use them. master_params: fp32 master weights for bf16/fp16 params, or [].
  // state_steps are one-element fp32 tensors, incremented by the op. With found_inf != 0 the step is
  // skipped whole; grads are divided by grad_scale (torch.amp.GradScaler's fused-optimizer contract).

  // SGD with momentum/dampening/nesterov (torch/optim/sgd.py). is_first_step: buffers := grad.
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] master_params, *, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adagrad (torch/optim/adagrad.py), dense gradients.
  m.def(
      "fused_adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, "
      "Tensor(d!)[] master_params, *, float lr, float lr_decay, float weight_decay, float eps, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // RMSprop (torch/optim/rmsprop.py); momentum_buffers used iff momentum > 0, grad_avgs iff centered.
  m.def(
      "fused_rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] grad_avgs, Tensor(e!)[] state_steps, "
      "Tensor(f!)[] master_params, *, float lr, float alpha, float eps, float weight_decay, float momentum, "
      "bool centered, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adam and AdamW (decoupled_weight_decay) (torch/optim/adam.py); max_exp_avg_sqs used iff amsgrad.
  m.def(
      "fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor(f!)[] master_params, *, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adamax (torch/optim/adamax.py).
  m.def(
      "fused_adamax_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_infs, "
      "Tensor(d!)[] state_steps, Tensor(e!)[] master_params, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // NAdam / NAdamW (torch/optim/nadam.py); mu_products are one-element fp32 tensors, updated here.
  m.def(
      "fused_nadam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] mu_products, Tensor(e!)[] state_steps, Tensor(f!)[] master_params, *, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, float momentum_decay, "
      "bool decoupled_weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // LAMB (You et al. 2019, Alg. 2): Adam moments, decoupled weight decay, per-tensor trust ratio.
  m.def(
      "fused_lamb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, Tensor(e!)[] master_params, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool bias_correction, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");

  // ---- flash attention (csrc/flash_attn/) ---------------------------------------------------------
  // FlashAttention-2 semantics. q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k,
  // headdim), nheads % nheads_k == 0; the last dim contiguous, other strides free. window -1 is
  // unbounded; causal is window_right = 0, aligned bottom-right; softcap 0 disables capping;
  // alibi_slopes fp32 (nheads) or (batch, nheads). softmax_lse is fp32 (fp64 for fp64 inputs) and +inf
  // for a query row that sees no key (whose output is 0). Python API: fastdl/ops/flash_attn.py.

  // Forward: out like q, softmax_lse (batch, nheads, seqlen_q).
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes) -> (Tensor out, Tensor softmax_lse)");
  // Forward on packed sequences: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), int32
  // cu_seqlens (batch + 1) prefix sums of the lengths; softmax_lse (nheads, total_q).
  m.def(
      "flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes) -> (Tensor out, Tensor softmax_lse)");
  // Backward of flash_attn_fwd, recomputing attention from softmax_lse. dsoftmax_lse: the gradient that
  // reached softmax_lse, or None. Returns (dq, dk, dv).
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? dsoftmax_lse, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Backward of flash_attn_varlen_fwd.
  m.def(
      "flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? dsoftmax_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // ---- end flash attention ------------------------------------------------------------------------
}

namespace fastdl::optim {
void bind_optim_fast_path(pybind11::module& m);  // optim/optim_python.cpp
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FASTDL_VERSION;
  info["source_hash"] = FASTDL_SOURCE_HASH;
  info["torch_version"] = FASTDL_TORCH_VERSION;
  info["cpu_isa"] = FASTDL_CPU_ISA;
  info["cpu_vec_isa"] = FASTDL_VEC_ISA;
  info["cxx_compiler"] = FASTDL_CXX_VERSION;
#ifdef FASTDL_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = FASTDL_CUDA_ARCHS;
  info["nvcc"] = FASTDL_NVCC_VERSION;
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = 0;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdl compiled kernels; ops live under torch.ops.fastdl";
  m.def("build_info", &build_info, "How this extension was built: version, ISA, CUDA, compilers.");
  auto optim = m.def_submodule("optim", "Positional fast entries to torch.ops.fastdl.fused_*_ (same dispatch)");
  fastdl::optim::bind_optim_fast_path(optim);
}
