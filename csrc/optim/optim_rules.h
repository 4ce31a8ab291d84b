// The update rules of torch.optim, written once for every backend.
//
// Each rule is templated on a math policy M that supplies the value type V (a SIMD vector of floats
// on CPU, one float per thread on CUDA) and its elementwise functions: splat, sqrt, abs, max, neg,
// fma(a, b, c) = a*b + c and fnma(a, b, c) = c - a*b, each rounded once. The arithmetic follows the
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

// The rules below are written in terms of torch's CPU pointwise ops, whose rounding they reproduce
// (SGD and Adamax agree with torch 2.13 bit for bit on AVX512). The rules that take a square root
// differ from torch in the last bit now and then: torch's CPU sqrt goes through MKL VML, which is not
// correctly rounded (sqrt(0.045369003f) gives 0.21300001f; the correctly rounded result, ours, is
// 0.21299999f), so the tests compare those within a relative 1e-6.
//   x.add_(y, alpha=s)          -> fma(y, s, x)
//   x.addcmul_(y, z, value=s)   -> fma(s * y, z, x)
//   x.addcdiv_(y, z, value=s)   -> x + (s * y) / z
//   x.lerp_(y, w), |w| < 0.5    -> fma(w, y - x, x);   otherwise y - (1 - w) * (y - x), fused
template <class M, typename V, typename S>
FASTDL_HD V add_scaled(const V& x, const V& y, S s) { return M::fma(y, M::splat(s), x); }
template <class M, typename V, typename S>
FASTDL_HD V addcmul(const V& x, const V& y, const V& z, S s) { return M::fma(M::splat(s) * y, z, x); }
template <class M, typename V, typename S>
FASTDL_HD V addcdiv(const V& x, const V& y, const V& z, S s) { return x + (M::splat(s) * y) / z; }
template <class M, typename V, typename S>
FASTDL_HD V lerp(const V& self, const V& end, S w, bool small) {
  return small ? M::fma(M::splat(w), end - self, self) : M::fnma(M::splat(S(1) - w), end - self, end);
}

// g <- -g if maximize; g <- g + wd * p for coupled (L2) weight decay (torch: grad.add(param, alpha=wd)).
template <class M, typename V, typename S>
FASTDL_HD V prepare_grad(V g, const V& p, const Hyper& h, const Coeffs<S>& c, bool coupled_decay) {
  if (h.maximize) g = M::neg(g);
  if (coupled_decay && h.weight_decay != 0) g = add_scaled<M>(g, p, c.weight_decay);
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
        s0 = h.is_first_step ? g : add_scaled<M>(s0 * M::splat(c.momentum), g, c.one_minus_dampening);
        g = h.nesterov ? add_scaled<M>(g, s0, c.momentum) : s0;
      }
      p = add_scaled<M>(p, g, c.neg_lr);
      break;
    }
    case Rule::kAdagrad: {  // adagrad.py: sum += g*g; p -= clr * g / (sqrt(sum) + eps)
      g = prepare_grad<M>(g, p, h, c, true);
      s0 = addcmul<M>(s0, g, g, S(1));
      p = addcdiv<M>(p, g, M::sqrt(s0) + M::splat(c.eps), c.neg_step_size);
      break;
    }
    case Rule::kRMSprop: {  // rmsprop.py: s0 square_avg, s1 momentum_buffer, s2 grad_avg
      g = prepare_grad<M>(g, p, h, c, true);
      s0 = addcmul<M>(s0 * M::splat(c.alpha), g, g, c.one_minus_alpha);
      V avg;
      if (h.centered) {
        s2 = lerp<M>(s2, g, c.one_minus_alpha, h.alpha > 0.5);
        avg = M::sqrt(addcmul<M>(s0, s2, s2, S(-1)));
      } else {
        avg = M::sqrt(s0);
      }
      avg = avg + M::splat(c.eps);
      if (h.momentum > 0) {
        s1 = addcdiv<M>(s1 * M::splat(c.momentum), g, avg, S(1));
        p = add_scaled<M>(p, s1, c.neg_lr);
      } else {
        p = addcdiv<M>(p, g, avg, c.neg_lr);
      }
      break;
    }
    case Rule::kAdam: {  // adam.py: s0 exp_avg, s1 exp_avg_sq, s2 max_exp_avg_sq
      const bool decoupled = h.decoupled_weight_decay;
      if (decoupled && h.weight_decay != 0) p = p * M::splat(c.decay);
      g = prepare_grad<M>(g, p, h, c, !decoupled);
      s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
      s1 = addcmul<M>(s1 * M::splat(c.beta2), g, g, c.one_minus_beta2);
      if (h.amsgrad) s2 = M::max(s2, s1);
      const V denom = M::sqrt(h.amsgrad ? s2 : s1) / M::splat(c.bc2_sqrt) + M::splat(c.eps);
      p = addcdiv<M>(p, s0, denom, c.neg_step_size);
      break;
    }
    case Rule::kAdamax: {  // adamax.py: s0 exp_avg, s1 exp_inf
      g = prepare_grad<M>(g, p, h, c, true);
      s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
      s1 = M::max(s1 * M::splat(c.beta2), M::abs(g) + M::splat(c.eps));
      p = addcdiv<M>(p, s0, s1, c.neg_step_size);
      break;
    }
    case Rule::kNAdam: {  // nadam.py: s0 exp_avg, s1 exp_avg_sq
      const bool decoupled = h.decoupled_weight_decay;
      if (decoupled && h.weight_decay != 0) p = p * M::splat(c.decay);
      g = prepare_grad<M>(g, p, h, c, !decoupled);
      s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
      s1 = addcmul<M>(s1 * M::splat(c.beta2), g, g, c.one_minus_beta2);
      const V denom = M::sqrt(s1 / M::splat(c.bc2)) + M::splat(c.eps);
      p = addcdiv<M>(p, g, denom, c.nadam_grad);
      p = addcdiv<M>(p, s0, denom, c.nadam_avg);
      break;
    }
    case Rule::kLAMB: {  // You et al. 2019, Algorithm 2; s0 exp_avg, s1 exp_avg_sq
      if (pass == 0) {
        if (h.maximize) g = M::neg(g);
        s0 = lerp<M>(s0, g, c.lerp_w, c.lerp_small);
        s1 = addcmul<M>(s1 * M::splat(c.beta2), g, g, c.one_minus_beta2);
      }
      const V update = (s0 * M::splat(c.inv_bc1)) / (M::sqrt(s1 * M::splat(c.inv_bc2)) + M::splat(c.eps)) +
                       p * M::splat(c.weight_decay);
      if (pass == 0) {
        acc0 = M::fma(p, p, acc0);
        acc1 = M::fma(update, update, acc1);
      } else {
        p = add_scaled<M>(p, update, c.neg_lr_trust);
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
