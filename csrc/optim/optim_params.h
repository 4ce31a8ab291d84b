// Parameters of one fused multi-tensor optimizer step. Plain data, no torch types: the CPU kernel,
// the torch-free CUDA launcher and the CUDA binding all read the same struct.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::optim {

enum class Rule : int { kSGD = 0, kAdagrad, kRMSprop, kAdam, kAdamax, kNAdam, kLAMB };


inline const char* rule_name(Rule r) {
  switch (r) {
    case Rule::kSGD: return "sgd";
    case Rule::kAdagrad: return "adagrad";
    case Rule::kRMSprop: return "rmsprop";
    case Rule::kAdam: return "adam";
    case Rule::kAdamax: return "adamax";
    case Rule::kNAdam: return "nadam";
    case Rule::kLAMB: return "lamb";
  }
  return "?";
}

// Hyperparameters of every rule, with torch.optim's names. Each rule reads only its own.
struct Hyper {
  double lr = 0, weight_decay = 0, eps = 0;
  double beta1 = 0, beta2 = 0;          // Adam, AdamW, Adamax, NAdam, LAMB
  double momentum = 0, dampening = 0;   // SGD, RMSprop (momentum)
  double alpha = 0;                     // RMSprop smoothing constant
  double lr_decay = 0;                  // Adagrad
  double momentum_decay = 0;            // NAdam
  bool nesterov = false, maximize = false, amsgrad = false, centered = false;
  bool decoupled_weight_decay = false;  // AdamW / NAdamW: p *= 1 - lr * wd instead of g += wd * p
  bool bias_correction = true;          // LAMB
  bool is_first_step = false;           // SGD: momentum buffers are initialised to the gradient
};

// Up to three state buffers per tensor, in rule order:
//   SGD: momentum_buffer            Adagrad: sum            RMSprop: square_avg, momentum_buffer, grad_avg
//   Adam: exp_avg, exp_avg_sq, max_exp_avg_sq                Adamax: exp_avg, exp_inf
//   NAdam: exp_avg, exp_avg_sq                               LAMB: exp_avg, exp_avg_sq
constexpr int kMaxStates = 3;

struct MultiTensorParams {
  Rule rule = Rule::kAdam;
  Hyper hyper;
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;         // [num_tensors]
  void* const* params = nullptr;           // [num_tensors] -> param_dtype[numel], updated in place
  const void* const* grads = nullptr;      // [num_tensors] -> param_dtype[numel]
  void* const* states[kMaxStates] = {};    // [num_tensors] -> state_dtype[numel]; nullptr when unused
  float* const* master = nullptr;          // [num_tensors] -> fp32[numel] master weights, or nullptr
  float* const* steps = nullptr;           // [num_tensors] -> fp32 step counter, incremented here
  float* const* mu_products = nullptr;     // NAdam: [num_tensors] -> fp32 running product of mu
  const float* grad_scale = nullptr;       // 1 element: gradients are divided by it (AMP), or nullptr
  const float* found_inf = nullptr;        // 1 element: nonzero skips the whole step, or nullptr
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  // LAMB scratch: [2 * num_tensors] fp64 sums of squares (||p||^2, ||update||^2), zeroed by the caller
  // (the CUDA kernel; the CPU kernel keeps its own). fp64, as the CPU kernel's sums: per-block
  // partials of a 10M-element tensor are ~150 atomics, and fp64 parameters need an fp64 trust ratio.
  double* norms = nullptr;
};

}  // namespace fastdl::optim
