// CPU multi-tensor optimizer step.
//
// All tensors of a group are cut into chunks of kChunk elements; one at::parallel_for runs over the
// chunks of every tensor, so 1,000 small tensors parallelise as well as one large one. Each chunk is
// a single pass over memory: load param, grad and state, apply the rule (optim_rules.h) in SIMD
// registers, store param and state. AdamW moves 28 bytes per fp32 parameter (read p, g, m, v; write
// p, m, v), so the step is memory-bound and this pass is the whole cost.
//
// fp32/fp64 storage is updated in place through at::vec loads. Low-precision storage (bf16/fp16, and
// fp32 master weights) goes through L1-sized fp32 tiles: convert in, update, convert out.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_utils.h"
#include "optim/optim_ops.h"
#include "optim/optim_rules.h"

namespace fastdl::optim {
namespace {

using cpu::Vec;

template <typename T>
struct VecMath {
  using V = Vec<T>;
  static V splat(T s) { return V(s); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V neg(const V& x) { return x.neg(); }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V fnma(const V& a, const V& b, const V& c) { return at::vec::fnmadd(a, b, c); }
};

// 64K elements per chunk: 256 KB of fp32 params, enough to amortise scheduling, small enough that
// 50 tensors of 200k give ~150 chunks to balance across cores.
constexpr int64_t kChunk = 1 << 16;
// fp32 tile for converted storage: 5 operands x 512 x 4 B = 10 KB, inside a 32 KB L1d.
constexpr int64_t kTile = 512;

struct Chunk {
  int64_t tensor, begin, end;
};

// Applies the rule to n elements held in math-type arrays. States that are nullptr are unused.
template <typename T>
void update_span(const MultiTensorParams& mt, const Coeffs<T>& c, int pass, int64_t n, T* p, const T* g, T* s0,
                 T* s1, T* s2, T* acc) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V acc0(T(0)), acc1(T(0));
  for (int64_t i = 0; i < n; i += W) {
    const int64_t cnt = std::min<int64_t>(W, n - i);
    auto load = [&](const T* ptr) { return ptr ? (cnt == W ? V::loadu(ptr + i) : V::loadu(ptr + i, cnt)) : V(T(0)); };
    auto store = [&](const V& v, T* ptr) {
      if (ptr) cnt == W ? v.store(ptr + i) : v.store(ptr + i, cnt);
    };
    V vp = load(p), vg = load(g), v0 = load(s0), v1 = load(s1), v2 = load(s2);
    if (mt.grad_scale) vg = vg / V(T(*mt.grad_scale));
    apply_rule<VecMath<T>>(mt.rule, pass, mt.hyper, c, vp, vg, v0, v1, v2, acc0, acc1);
    if (!(pass == 0 && mt.rule == Rule::kLAMB)) store(vp, p);  // LAMB's first pass only reads p
    store(v0, s0);
    store(v1, s1);
    store(v2, s2);
  }
  if (acc) {
    acc[0] += at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, acc0);
    acc[1] += at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, acc1);
  }
}

template <typename param_t, typename state_t>
void run_chunk(const MultiTensorParams& mt, const Coeffs<cpu::opmath_t<param_t>>& c, int pass, const Chunk& ch,
               double* acc_out) {
  using T = cpu::opmath_t<param_t>;
  const int64_t t = ch.tensor;
  auto* param = static_cast<param_t*>(mt.params[t]);
  const auto* grad = static_cast<const param_t*>(mt.grads[t]);
  state_t* state[kMaxStates];
  for (int k = 0; k < kMaxStates; ++k) state[k] = mt.states[k] ? static_cast<state_t*>(mt.states[k][t]) : nullptr;
  float* master = mt.master ? mt.master[t] : nullptr;
  T acc[2] = {T(0), T(0)};
  T* accp = acc_out ? acc : nullptr;

  constexpr bool direct = std::is_same_v<param_t, T> && std::is_same_v<state_t, T>;
  if constexpr (direct) {
    const int64_t b = ch.begin, n = ch.end - ch.begin;
    update_span<T>(mt, c, pass, n, param + b, grad + b, state[0] ? state[0] + b : nullptr,
                   state[1] ? state[1] + b : nullptr, state[2] ? state[2] + b : nullptr, accp);
  } else {
    alignas(64) T tp[kTile], tg[kTile], ts[kMaxStates][kTile];
    const bool writes_param = !(pass == 0 && mt.rule == Rule::kLAMB);
    for (int64_t b = ch.begin; b < ch.end; b += kTile) {
      const int64_t n = std::min<int64_t>(kTile, ch.end - b);
      if (master) {
        std::copy(master + b, master + b + n, tp);
      } else {
        cpu::convert_n(param + b, tp, n);
      }
      cpu::convert_n(grad + b, tg, n);
      T* sp[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k) {
        sp[k] = state[k] ? ts[k] : nullptr;
        if (state[k]) cpu::convert_n(state[k] + b, ts[k], n);
      }
      update_span<T>(mt, c, pass, n, tp, tg, sp[0], sp[1], sp[2], accp);
      if (writes_param) {
        if (master) std::copy(tp, tp + n, master + b);
        cpu::convert_n(tp, param + b, n);
      }
      for (int k = 0; k < kMaxStates; ++k)
        if (state[k]) cpu::convert_n(ts[k], state[k] + b, n);
    }
  }
  if (acc_out) {
    acc_out[0] = double(acc[0]);
    acc_out[1] = double(acc[1]);
  }
}

template <typename param_t, typename state_t>
void step_impl(const MultiTensorParams& mt) {
  using T = cpu::opmath_t<param_t>;
  const int64_t n = mt.num_tensors;

  // Per-tensor scalars, computed serially: the step counter (and NAdam's mu product) are advanced
  // here, once per tensor, as torch advances state["step"] before using it.
  std::vector<Coeffs<T>> coeffs(n);
  for (int64_t t = 0; t < n; ++t) {
    double step = 0, mu = 0, mu_next = 0;
    float mu_product = 1.0f;
    if (mt.steps) {
      *mt.steps[t] += 1.0f;
      step = double(*mt.steps[t]);
    }
    if (mt.rule == Rule::kNAdam) {
      mu = nadam_mu(mt.hyper, step);
      mu_next = nadam_mu(mt.hyper, step + 1);
      // torch: `mu_product *= mu` on an fp32 tensor, i.e. rounded to fp32 each step.
      *mt.mu_products[t] = *mt.mu_products[t] * static_cast<float>(mu);
      mu_product = *mt.mu_products[t];
    }
    coeffs[t] = make_coeffs<T>(mt.rule, mt.hyper, step, mu, mu_next, mu_product);
  }

  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < mt.numels[t]; b += kChunk) chunks.push_back({t, b, std::min(mt.numels[t], b + kChunk)});
  const int64_t nchunks = static_cast<int64_t>(chunks.size());

  // Below ~two chunks of work a parallel region costs more than it saves (torch's GRAIN_SIZE is 32K).
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) total += mt.numels[t];
  const int64_t grain = total < 2 * kChunk ? nchunks : 1;

  if (mt.rule != Rule::kLAMB) {
    at::parallel_for(0, nchunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) run_chunk<param_t, state_t>(mt, coeffs[chunks[i].tensor], 0, chunks[i], nullptr);
    });
    return;
  }
  // LAMB: pass 0 updates the moments and sums ||p||^2 and ||update||^2 per chunk; the per-tensor
  // trust ratio then scales pass 1, which recomputes the update from the new moments and applies it.
  std::vector<double> partial(2 * nchunks, 0.0);
  at::parallel_for(0, nchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      run_chunk<param_t, state_t>(mt, coeffs[chunks[i].tensor], 0, chunks[i], &partial[2 * i]);
  });
  std::vector<double> norms(2 * n, 0.0);
  for (int64_t i = 0; i < nchunks; ++i) {
    norms[2 * chunks[i].tensor] += partial[2 * i];
    norms[2 * chunks[i].tensor + 1] += partial[2 * i + 1];
  }
  for (int64_t t = 0; t < n; ++t)
    coeffs[t].neg_lr_trust = T(-mt.hyper.lr * lamb_trust_ratio(norms[2 * t], norms[2 * t + 1]));
  at::parallel_for(0, nchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_chunk<param_t, state_t>(mt, coeffs[chunks[i].tensor], 1, chunks[i], nullptr);
  });
}

void launch_cpu(const MultiTensorParams& mt) {
  // AMP: a step whose gradients hold inf/NaN is skipped whole, steps included (as torch's fused Adam).
  if (mt.found_inf && *mt.found_inf != 0.0f) return;
  const bool low_master = mt.state_dtype == DType::kFloat32 && mt.param_dtype != DType::kFloat32;
  switch (mt.param_dtype) {
    case DType::kFloat32: return step_impl<float, float>(mt);
    case DType::kFloat64: return step_impl<double, double>(mt);
    case DType::kBFloat16:
      return low_master ? step_impl<c10::BFloat16, float>(mt) : step_impl<c10::BFloat16, c10::BFloat16>(mt);
    case DType::kFloat16:
      return low_master ? step_impl<c10::Half, float>(mt) : step_impl<c10::Half, c10::Half>(mt);
  }
}

}  // namespace
}  // namespace fastdl::optim

TORCH_LIBRARY_IMPL(fastdl, CPU, m) { FASTDL_REGISTER_OPTIM_IMPLS(m, fastdl::optim::launch_cpu); }
