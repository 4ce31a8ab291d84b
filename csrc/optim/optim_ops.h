// Torch-facing bodies of the fused optimizer ops, shared by the CPU and CUDA registrations.
// Every check runs before any tensor is touched, so a bad call leaves parameters and state unchanged.
#pragma once
#include <torch/types.h>

#include <optional>
#include <vector>

#include "common/check.h"
#include "optim/optim_params.h"

namespace fastdl::optim {

using at::Tensor;
using at::TensorList;
using LaunchFn = void (*)(const MultiTensorParams&);

// Owns the pointer arrays that a MultiTensorParams points into.
struct MultiTensorArgs {
  MultiTensorParams params;
  std::vector<int64_t> numels;
  std::vector<void*> param_ptrs;
  std::vector<const void*> grad_ptrs;
  std::vector<void*> state_ptrs[kMaxStates];
  std::vector<float*> master_ptrs, step_ptrs, mu_ptrs;
};

// Validates the lists of one step and fills `args`. `states[k]` may be empty when the rule's options
// do not use buffer k (e.g. max_exp_avg_sqs without amsgrad); `required[k]` says whether it is needed.
inline void collect(MultiTensorArgs& args, const char* op, Rule rule, const Hyper& hyper, TensorList params,
                    TensorList grads, std::vector<std::pair<const char*, TensorList>> states,
                    std::vector<bool> required, TensorList master, std::optional<TensorList> steps,
                    std::optional<TensorList> mu_products, const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto& mt = args.params;
  mt.rule = rule;
  mt.hyper = hyper;
  mt.num_tensors = n;
  TORCH_CHECK(grads.size() == params.size(), op, ": expected one gradient per parameter (", n, "), got ",
              grads.size());
  const bool use_master = !master.empty();
  TORCH_CHECK(!use_master || static_cast<int64_t>(master.size()) == n, op, ": master_params must be empty or have ",
              n, " entries, got ", master.size());
  if (n == 0) return;

  const Tensor& p0 = params[0];
  const auto device = p0.device();
  mt.param_dtype = to_dtype(p0.scalar_type(), op, "params[0]");
  TORCH_CHECK(!use_master || p0.scalar_type() == at::kBFloat16 || p0.scalar_type() == at::kHalf, op,
              ": fp32 master weights are for bfloat16 or float16 parameters, got ", p0.scalar_type());
  const at::ScalarType state_type = use_master ? at::kFloat : p0.scalar_type();
  mt.state_dtype = to_dtype(state_type, op, "state");

  for (size_t k = 0; k < states.size(); ++k) {
    const auto& [name, list] = states[k];
    if (required[k]) {
      TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": expected ", n, " ", name, ", got ", list.size());
    } else {
      TORCH_CHECK(list.empty() || static_cast<int64_t>(list.size()) == n, op, ": ", name,
                  " must be empty or have ", n, " entries, got ", list.size());
    }
  }

  // Every list length before any element is read.
  if (steps) TORCH_CHECK(static_cast<int64_t>(steps->size()) == n, op, ": expected ", n, " state_steps, got ", steps->size());
  if (mu_products)
    TORCH_CHECK(static_cast<int64_t>(mu_products->size()) == n, op, ": expected ", n, " mu_products, got ",
                mu_products->size());

  auto check_like = [&](const Tensor& t, const Tensor& p, at::ScalarType dtype, const char* name, int64_t i) {
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but params[0] is on ",
                device, "; all tensors of one step must share a device");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] must be dense, got layout ", t.layout());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] must have dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] must have shape ", shape_str(p.sizes()),
                ", got ", shape_str(t.sizes()));
    TORCH_CHECK(t.numel() <= 1 || t.strides() == p.strides(), op, ": ", name, "[", i,
                "] must have the strides of its parameter ", shape_str(p.strides()), ", got ",
                shape_str(t.strides()));
  };

  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ", device,
                "; all tensors of one step must share a device");
    TORCH_CHECK(p.scalar_type() == p0.scalar_type(), op, ": params[", i, "] has dtype ", p.scalar_type(),
                " but params[0] has ", p0.scalar_type(), "; one step takes one dtype");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] must be dense, got layout ", p.layout());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be non-overlapping and dense (a view into part of a tensor cannot be updated in place "
                "by a flat kernel)");
    check_like(grads[i], p, p.scalar_type(), "grads", i);
    for (size_t k = 0; k < states.size(); ++k) {
      if (!states[k].second.empty()) check_like(states[k].second[i], p, state_type, states[k].first, i);
    }
    if (use_master) check_like(master[i], p, at::kFloat, "master_params", i);
    auto check_scalar = [&](const Tensor& t, const char* name) {
      TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", name, "[", i,
                  "] must be a one-element float32 tensor, got shape ", shape_str(t.sizes()), " and dtype ",
                  t.scalar_type());
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] must be on ", device, ", got ", t.device());
    };
    if (steps) check_scalar((*steps)[i], "state_steps");
    if (mu_products) check_scalar((*mu_products)[i], "mu_products");
  }
  for (const auto* opt : {&grad_scale, &found_inf}) {
    if (opt->has_value()) {
      const Tensor& t = **opt;
      const char* name = opt == &grad_scale ? "grad_scale" : "found_inf";
      TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, op, ": ", name,
                  " must be a one-element float32 tensor, got shape ", shape_str(t.sizes()), " and dtype ",
                  t.scalar_type());
      TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
    }
  }

  // All checks passed: gather raw pointers.
  args.numels.resize(n);
  args.param_ptrs.resize(n);
  args.grad_ptrs.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    args.numels[i] = params[i].numel();
    args.param_ptrs[i] = params[i].data_ptr();
    args.grad_ptrs[i] = grads[i].data_ptr();
  }
  mt.numels = args.numels.data();
  mt.params = args.param_ptrs.data();
  mt.grads = args.grad_ptrs.data();
  for (size_t k = 0; k < states.size(); ++k) {
    if (states[k].second.empty()) continue;
    args.state_ptrs[k].resize(n);
    for (int64_t i = 0; i < n; ++i) args.state_ptrs[k][i] = states[k].second[i].data_ptr();
    mt.states[k] = args.state_ptrs[k].data();
  }
  auto float_ptrs = [&](TensorList list, std::vector<float*>& out) -> float* const* {
    out.resize(list.size());
    for (size_t i = 0; i < list.size(); ++i) out[i] = list[i].data_ptr<float>();
    return out.data();
  };
  if (use_master) mt.master = float_ptrs(master, args.master_ptrs);
  if (steps) mt.steps = float_ptrs(*steps, args.step_ptrs);
  if (mu_products) mt.mu_products = float_ptrs(*mu_products, args.mu_ptrs);
  if (grad_scale) mt.grad_scale = grad_scale->data_ptr<float>();
  if (found_inf) mt.found_inf = found_inf->data_ptr<float>();
}

// Hyperparameter checks shared by all rules (the Python classes check too, with torch's messages).
inline void check_hyper(const char* op, const Hyper& h) {
  TORCH_CHECK(h.lr >= 0, op, ": lr must be >= 0, got ", h.lr);
  TORCH_CHECK(h.eps >= 0, op, ": eps must be >= 0, got ", h.eps);
  TORCH_CHECK(h.weight_decay >= 0, op, ": weight_decay must be >= 0, got ", h.weight_decay);
  TORCH_CHECK(h.beta1 >= 0 && h.beta1 < 1, op, ": beta1 must be in [0, 1), got ", h.beta1);
  TORCH_CHECK(h.beta2 >= 0 && h.beta2 < 1, op, ": beta2 must be in [0, 1), got ", h.beta2);
  TORCH_CHECK(h.momentum >= 0, op, ": momentum must be >= 0, got ", h.momentum);
}

// ---- op bodies, one per schema in csrc/ops.cpp; Launch is the CPU or CUDA kernel ----

template <LaunchFn Launch>
void fused_sgd(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList master_params,
               double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
               bool is_first_step, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.momentum = momentum, h.dampening = dampening, h.weight_decay = weight_decay;
  h.nesterov = nesterov, h.maximize = maximize, h.is_first_step = is_first_step;
  check_hyper("fused_sgd_", h);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0),
              "fused_sgd_: nesterov momentum requires momentum > 0 and zero dampening");
  MultiTensorArgs args;
  collect(args, "fused_sgd_", Rule::kSGD, h, params, grads, {{"momentum_buffers", momentum_buffers}},
          {momentum != 0}, master_params, std::nullopt, std::nullopt, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

template <LaunchFn Launch>
void fused_adagrad(TensorList params, TensorList grads, TensorList state_sums, TensorList state_steps,
                   TensorList master_params, double lr, double lr_decay, double weight_decay, double eps,
                   bool maximize, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.lr_decay = lr_decay, h.weight_decay = weight_decay, h.eps = eps, h.maximize = maximize;
  check_hyper("fused_adagrad_", h);
  TORCH_CHECK(lr_decay >= 0, "fused_adagrad_: lr_decay must be >= 0, got ", lr_decay);
  MultiTensorArgs args;
  collect(args, "fused_adagrad_", Rule::kAdagrad, h, params, grads, {{"state_sums", state_sums}}, {true},
          master_params, state_steps, std::nullopt, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

template <LaunchFn Launch>
void fused_rmsprop(TensorList params, TensorList grads, TensorList square_avgs, TensorList momentum_buffers,
                   TensorList grad_avgs, TensorList state_steps, TensorList master_params, double lr, double alpha,
                   double eps, double weight_decay, double momentum, bool centered, bool maximize,
                   const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.alpha = alpha, h.eps = eps, h.weight_decay = weight_decay, h.momentum = momentum;
  h.centered = centered, h.maximize = maximize;
  check_hyper("fused_rmsprop_", h);
  TORCH_CHECK(alpha >= 0, "fused_rmsprop_: alpha must be >= 0, got ", alpha);
  MultiTensorArgs args;
  collect(args, "fused_rmsprop_", Rule::kRMSprop, h, params, grads,
          {{"square_avgs", square_avgs}, {"momentum_buffers", momentum_buffers}, {"grad_avgs", grad_avgs}},
          {true, momentum > 0, centered}, master_params, state_steps, std::nullopt, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

template <LaunchFn Launch>
void fused_adam(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList max_exp_avg_sqs, TensorList state_steps, TensorList master_params, double lr,
                double beta1, double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                bool decoupled_weight_decay, const std::optional<Tensor>& grad_scale,
                const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.beta1 = beta1, h.beta2 = beta2, h.weight_decay = weight_decay, h.eps = eps;
  h.amsgrad = amsgrad, h.maximize = maximize, h.decoupled_weight_decay = decoupled_weight_decay;
  check_hyper("fused_adam_", h);
  MultiTensorArgs args;
  collect(args, "fused_adam_", Rule::kAdam, h, params, grads,
          {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs}},
          {true, true, amsgrad}, master_params, state_steps, std::nullopt, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

template <LaunchFn Launch>
void fused_adamax(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_infs,
                  TensorList state_steps, TensorList master_params, double lr, double beta1, double beta2,
                  double weight_decay, double eps, bool maximize, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.beta1 = beta1, h.beta2 = beta2, h.weight_decay = weight_decay, h.eps = eps, h.maximize = maximize;
  check_hyper("fused_adamax_", h);
  MultiTensorArgs args;
  collect(args, "fused_adamax_", Rule::kAdamax, h, params, grads, {{"exp_avgs", exp_avgs}, {"exp_infs", exp_infs}},
          {true, true}, master_params, state_steps, std::nullopt, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

template <LaunchFn Launch>
void fused_nadam(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList mu_products, TensorList state_steps, TensorList master_params, double lr, double beta1,
                 double beta2, double weight_decay, double eps, double momentum_decay, bool decoupled_weight_decay,
                 bool maximize, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.beta1 = beta1, h.beta2 = beta2, h.weight_decay = weight_decay, h.eps = eps;
  h.momentum_decay = momentum_decay, h.decoupled_weight_decay = decoupled_weight_decay, h.maximize = maximize;
  check_hyper("fused_nadam_", h);
  TORCH_CHECK(momentum_decay >= 0, "fused_nadam_: momentum_decay must be >= 0, got ", momentum_decay);
  MultiTensorArgs args;
  collect(args, "fused_nadam_", Rule::kNAdam, h, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
          {true, true}, master_params, state_steps, mu_products, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

template <LaunchFn Launch>
void fused_lamb(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList state_steps, TensorList master_params, double lr, double beta1, double beta2,
                double weight_decay, double eps, bool bias_correction, bool maximize,
                const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  Hyper h;
  h.lr = lr, h.beta1 = beta1, h.beta2 = beta2, h.weight_decay = weight_decay, h.eps = eps;
  h.bias_correction = bias_correction, h.maximize = maximize;
  check_hyper("fused_lamb_", h);
  MultiTensorArgs args;
  collect(args, "fused_lamb_", Rule::kLAMB, h, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
          {true, true}, master_params, state_steps, std::nullopt, grad_scale, found_inf);
  if (args.params.num_tensors) Launch(args.params);
}

// Registers every fused optimizer op for one dispatch key (CPU or CUDA) with that backend's launcher.
#define FASTDL_REGISTER_OPTIM_IMPLS(m, LAUNCH)                        \
  m.impl("fused_sgd_", &fastdl::optim::fused_sgd<LAUNCH>);             \
  m.impl("fused_adagrad_", &fastdl::optim::fused_adagrad<LAUNCH>);     \
  m.impl("fused_rmsprop_", &fastdl::optim::fused_rmsprop<LAUNCH>);     \
  m.impl("fused_adam_", &fastdl::optim::fused_adam<LAUNCH>);           \
  m.impl("fused_adamax_", &fastdl::optim::fused_adamax<LAUNCH>);       \
  m.impl("fused_nadam_", &fastdl::optim::fused_nadam<LAUNCH>);         \
  m.impl("fused_lamb_", &fastdl::optim::fused_lamb<LAUNCH>)

}  // namespace fastdl::optim
