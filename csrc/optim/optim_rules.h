// The update rules of torch.optim, written once for every backend.
//
// Each rule is templated on a math policy M that supplies the value type V (a SIMD vector of floats
// on CPU, one float per thread on CUDA) and its elementwise functions. The arithmetic follows the
// order of operations of torch.optim's single-tensor implementations (torch/optim/*.py), so that
// fp32 results agree with torch to rounding: e.g. Adam's denominator is sqrt(v) / sqrt(bc2) + eps,
// not sqrt(v / bc2) + eps, because that is what torch computes.
//
// Per-tensor scalars (bias corrections, step sizes) depend on the step count and are computed once
// per tensor in double, by make_coeffs, then rounded to the math type as torch rounds Python floats.
#pragma once
#include <cmath>

#include "optim/optim_params.h"

#if defined(__CUDACC__)
#define FASTDL_HD __host__ __device__ __forceinline__
#else
#define FASTDL_HD inline
#endif

namespace fastdl::optim {

template <typename S>
struct Coeffs {
  S weight_decay, eps, neg_lr;
  S lerp_w;                  // weight of torch's lerp_(grad, 1 - beta) for the first moment
  bool lerp_small;           // torch's lerp uses a different (exact at w = 1) formula for w >= 0.5
  S beta2, one_minus_beta2;
  S decay;                   // 1 - lr * weight_decay, for decoupled weight decay
  S neg_step_size;           // Adam: -lr / bc1; Adamax, Adagrad: -lr / (decayed or bias-corrected)
  S bc2_sqrt;                // Adam: sqrt(1 - beta2^t)
  S bc2;                     // NAdam: 1 - beta2^t
  S nadam_grad, nadam_avg;   // NAdam: coefficients of g / denom and m / denom
  S inv_bc1, inv_bc2;        // LAMB bias corrections (1 when bias_correction is off)
  S momentum, one_minus_dampening;  // SGD, RMSprop
  S alpha, one_minus_alpha;  // RMSprop
  S neg_lr_trust;            // LAMB second pass: -lr * ||p|| / ||update||
};

// Scalars of one tensor's update at step `step` (already incremented, as torch does before use).
// `mu_product` is NAdam's running product including this step's mu; `mu_product_f32` is that product
// as torch stores it (an fp32 tensor), which is what torch reads back through .item().
template <typename S>
FASTDL_HD Coeffs<S> make_coeffs(Rule rule, const Hyper& h, double step, double mu, double mu_next, float mu_product_f32) {
  Coeffs<S> c{};
  c.weight_decay = S(h.weight_decay);
  c.eps = S(h.eps);
  c.neg_lr = S(-h.lr);
  const double w1 = 1.0 - h.beta1;
  c.lerp_w = S(w1);
  c.lerp_small = w1 < 0.5;  // torch: is_lerp_weight_small(w) := |w| < 0.5
  c.beta2 = S(h.beta2);
  c.one_minus_beta2 = S(1.0 - h.beta2);
  c.decay = S(1.0 - h.lr * h.weight_decay);
  c.momentum = S(h.momentum);
  c.one_minus_dampening = S(1.0 - h.dampening);
  c.alpha = S(h.alpha);
  c.one_minus_alpha = S(1.0 - h.alpha);
  const double bc1 = 1.0 - pow(h.beta1, step);
  const double bc2 = 1.0 - pow(h.beta2, step);
  // Adam and Adamax: lr / bc1. Adagrad: its decayed lr (adagrad.py: clr = lr / (1 + (t - 1) * lr_decay)).
  c.neg_step_size = rule == Rule::kAdagrad ? S(-h.lr / (1.0 + (step - 1.0) * h.lr_decay)) : S(-h.lr / bc1);
  c.bc2_sqrt = S(sqrt(bc2));
  c.bc2 = S(bc2);
  const double mp = double(mu_product_f32);
  c.nadam_grad = S(-h.lr * (1.0 - mu) / (1.0 - mp));
  c.nadam_avg = S((-h.lr * mu_next) / (1.0 - mp * mu_next));
  c.inv_bc1 = S(h.bias_correction ? 1.0 / bc1 : 1.0);
  c.inv_bc2 = S(h.bias_correction ? 1.0 / bc2 : 1.0);
  c.neg_lr_trust = S(-h.lr);
  return c;
}

// NAdam's momentum schedule: mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)) (Dozat 2016, as in torch).
FASTDL_HD double nadam_mu(const Hyper& h, double step) {
  return h.beta1 * (1.0 - 0.5 * pow(0.96, step * h.momentum_decay));
}

// torch.lerp(self, end, w): self + w * (end - self) for |w| < 0.5, else end - (end - self) * (1 - w).
template <class M, typename V, typename S>
FASTDL_HD V lerp(const V& self, const V& end, S w, bool small) {
  return small ? self + M::splat(w) * (end - self) : end - (end - self) * M::splat(S(1) - w);
}

// g <- -g if maximize; g <- g + wd * p for coupled (L2) weight decay.
template <class M, typename V, typename S>
FASTDL_HD V prepare_grad(V g, const V& p, const Hyper& h, const Coeffs<S>& c, bool coupled_decay) {
  if (h.maximize) g = M::neg(g);
  if (coupled_decay && h.weight_decay != 0) g = g + p * M::splat(c.weight_decay);
  return g;
}

// One update of one vector of elements. s0..s2 are the rule's state buffers (see optim_params.h);
// acc0/acc1 collect LAMB's sums of squares in its first pass.
template <class M, typename V, typename S>
FASTDL_HD void apply_rule(Rule rule, int pass, const Hyper& h, const Coeffs<S>& c, V& p, V g, V& s0, V& s1,
                          V& s2, V& acc0, V& acc1) {
  switch (rule) {
    case Rule::kSGD: {  // torch/optim/sgd.py _single_tensor_sgd
      g = prepare_grad<M>(g, p, h, c, true);
      if (h.momentum != 0) {
        s0 = h.is_first_step ? g : s0 * M::splat(c.momentum) + g * M::splat(c.one_minus_dampening);
        g = h.nesterov ? g + s0 * M::splat(c.momentum) : s0;
      }
      p = p + g * M::splat(c.neg_lr);
      break;
    }
    case Rule::kAdagrad: {  // adagrad.py: sum += g*g; p -= clr * g / (sqrt(sum) + eps)
      g = prepare_grad<M>(g, p, h, c, true);
      s0 = s0 + g * g;
      const V std_ = M::sqrt(s0) + M::splat(c.eps);
      p = p + M::splat(c.neg_step_size) * (g / std_);
      break;
    }
    case Rule::kRMSprop: {  // rmsprop.py: s0 square_avg, s1 momentum_buffer, s2 grad_avg
      g = prepare_grad<M>(g, p, h, c, true);
      s0 = s0 * M::splat(c.alpha) + M::splat(c.one_minus_alpha) * g * g;
      V avg;
      if (h.centered) {
        s2 = lerp<M>(s2, g, c.one_minus_alpha, h.alpha > 0.5);
        avg = M::sqrt(s0 - s2 * s2);
      } else {
        avg = M::sqrt(s0);
      }
      avg = avg + M::splat(c.eps);
      if (h.momentum > 0) {
        s1 = s1 * M::splat(c.momentum) + g / avg;
        p = p + s1 * M::splat(c.neg_lr);
      } else {
        p = p + M::splat(c.neg_lr) * (g / avg);
      }
      break;
    }
    case Rule::kAdam: {  // adam.py: s0 exp_avg, s1 exp_avg_sq, s2 max_exp_avg_sq
      const bool decoupled = h.decoupled_weight_decay;
      if (decoupled && h.weight_decay != 0) p = p * M::splat(c.decay);
      g = prepare_grad<M>(g, p, h, c, !decoupled);
      s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
      s1 = s1 * M::splat(c.beta2) + M::splat(c.one_minus_beta2) * g * g;
      V denom;
      if (h.amsgrad) {
        s2 = M::max(s2, s1);
        denom = M::sqrt(s2) / M::splat(c.bc2_sqrt) + M::splat(c.eps);
      } else {
        denom = M::sqrt(s1) / M::splat(c.bc2_sqrt) + M::splat(c.eps);
      }
      p = p + M::splat(c.neg_step_size) * (s0 / denom);
      break;
    }
    case Rule::kAdamax: {  // adamax.py: s0 exp_avg, s1 exp_inf
      g = prepare_grad<M>(g, p, h, c, true);
      s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
      s1 = M::max(s1 * M::splat(c.beta2), M::abs(g) + M::splat(c.eps));
      p = p + M::splat(c.neg_step_size) * (s0 / s1);
      break;
    }
    case Rule::kNAdam: {  // nadam.py: s0 exp_avg, s1 exp_avg_sq
      const bool decoupled = h.decoupled_weight_decay;
      if (decoupled && h.weight_decay != 0) p = p * M::splat(c.decay);
      g = prepare_grad<M>(g, p, h, c, !decoupled);
      s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
      s1 = s1 * M::splat(c.beta2) + M::splat(c.one_minus_beta2) * g * g;
      const V denom = M::sqrt(s1 / M::splat(c.bc2)) + M::splat(c.eps);
      p = p + M::splat(c.nadam_grad) * (g / denom);
      p = p + M::splat(c.nadam_avg) * (s0 / denom);
      break;
    }
    case Rule::kLAMB: {  // You et al. 2019, Algorithm 2; s0 exp_avg, s1 exp_avg_sq
      if (pass == 0) {
        if (h.maximize) g = M::neg(g);
        s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
        s1 = s1 * M::splat(c.beta2) + M::splat(c.one_minus_beta2) * g * g;
      }
      const V update = (s0 * M::splat(c.inv_bc1)) / (M::sqrt(s1 * M::splat(c.inv_bc2)) + M::splat(c.eps)) +
                       p * M::splat(c.weight_decay);
      if (pass == 0) {
        acc0 = acc0 + p * p;
        acc1 = acc1 + update * update;
      } else {
        p = p + M::splat(c.neg_lr_trust) * update;
      }
      break;
    }
  }
}

// LAMB's trust ratio phi(||p||) / ||update|| with phi = identity; 1 when either norm is zero (as in
// the reference implementations, so that zero-initialised tensors such as biases still move).
FASTDL_HD double lamb_trust_ratio(double p_sq, double u_sq) {
  return (p_sq > 0 && u_sq > 0) ? sqrt(p_sq) / sqrt(u_sq) : 1.0;
}

}  // namespace fastdl::optim
