// CUDA fused multi-tensor optimizer step: the rules of optim_rules.h applied to whole lists of
// tensors in a few launches, where torch's for-loop optimizers launch several kernels per tensor.
// The chunking follows apex's multi_tensor_apply and PyTorch's MultiTensorApply.cuh (chunk 65536,
// 512 threads, ILP 4); the packing of the lists and the handling of the step counters are ours.
//
// Work split. Each tensor is cut into chunks of kChunkElements; one thread block updates one chunk.
// A launch covers a batch of up to kBatchBlocks chunks from up to kBatchTensors tensors. The
// batch's pointers and its block -> tensor table travel by value in the kernel's parameter space
// (UpdateKernelArgs, at most 4 KB, the limit before CUDA 12.1), so no host-to-device copy and no
// allocation precede a launch. Longer lists are split into several launches on the same stream.
//
// Inside a chunk each thread updates kIlp = 4 consecutive elements per iteration, with one vector
// access per operand (16 B for fp32, 8 B for bf16/fp16, 2 x 16 B for fp64) when every pointer of
// the tensor is aligned to it, and with kIlp coalesced scalar accesses otherwise. AdamW moves 28 B
// per fp32 parameter and does ~20 flops on it, so the step is memory-bound; 512 threads x 4 operands
// x 16 B = 32 KB in flight per block is what covers HBM latency.
//
// Per-tensor scalars. The step counters (and NAdam's mu products) live on the device, so the host
// cannot compute bias corrections without a synchronisation. Thread 0 of every block reads its
// tensor's counter, takes step + 1 (torch increments before use), computes make_coeffs in double
// and shares the result through shared memory. The counters themselves are written by
// advance_step_counters_kernel (optim_launch.cu), launched after every update kernel of the step:
// blocks of one tensor run in any order, so a block that wrote the counter could be seen by a
// block of the same tensor that has not read it yet.
//
// AMP. Every kernel reads *found_inf first and returns when it is nonzero, so a skipped step leaves
// parameters, states and counters untouched (the contract of torch's _fused_adam_). Gradients are
// divided by *grad_scale.
//
// LAMB. Pass 0 updates the moments and adds each block's ||p||^2 and ||update||^2 to its tensor's
// two fp64 slots of `norms` (atomicAdd). Pass 1 is launched after pass 0 has run over every batch,
// since a tensor's chunks may span batches; it reads the sums, forms the trust ratio and applies
// the update recomputed from the new moments.
//
// Master weights. With `master` set, the math reads and writes the fp32 master copy, the bf16/fp16
// parameter receives its round-to-nearest-even copy, and the states are fp32.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "optim/optim_params.h"
#include "optim/optim_rules.h"

namespace fastdl::optim {

// One whole optimizer step on `stream` (defined in optim_launch.cu): the update kernels of the
// params' storage types, then the step-counter advance. No synchronisation; returns the first error.
cudaError_t launch_multi_tensor_step(const MultiTensorParams& mt, cudaStream_t stream);

// The update kernels of one storage pair (param_t, state_t); instantiated in optim_<dtype>.cu.
template <typename param_t, typename state_t>
cudaError_t launch_update_kernels(const MultiTensorParams& mt, cudaStream_t stream);

namespace multi_tensor {

constexpr int kBlockThreads = 512;
constexpr int kIlp = 4;
// 32 iterations of 512 threads x 4 elements; 256 KB of fp32 parameters per block.
constexpr int64_t kChunkElements = 65536;
// 320 blocks fill a 132-SM H100/H200 2.4 times over and a 108-SM A100 three times (as PyTorch).
constexpr int kBatchBlocks = 320;
constexpr int kBatchTensors = 64;    // block_tensor is uint8_t
constexpr int kBatchPointers = 336;  // what is left of 4 KB: 56 tensors with 6 operand lists
constexpr size_t kKernelParamBytes = 4096;

// Operand lists of a tensor, in the order of their rows in TensorBatch::pointers.
enum Operand : int { kParam, kGrad, kState0, kState1, kState2, kMaster, kStep, kMuProduct, kNumOperands };

// State buffers each rule reads (see optim_params.h); unused ones are never loaded.
constexpr int state_count(Rule rule) {
  switch (rule) {
    case Rule::kSGD:
    case Rule::kAdagrad: return 1;
    case Rule::kAdamax:
    case Rule::kNAdam:
    case Rule::kLAMB: return 2;
    case Rule::kRMSprop:
    case Rule::kAdam: return 3;
  }
  return kMaxStates;
}

// Arguments shared by every launch of one step.
struct StepArgs {
  Hyper hyper;
  const float* grad_scale;  // nullptr: gradients are used as they are
  const float* found_inf;   // nullptr: the step is never skipped
};

// One launch's share of the tensor lists. Blocks of one tensor are consecutive, so a block finds
// its chunk as first_chunk[t] + (blockIdx.x - first_block[t]). Tensors are consecutive too
// (including empty ones, which get a slot but no block), so LAMB's sums of local tensor t are
// norms[2 t], norms[2 t + 1] with `norms` offset to the batch's first tensor.
struct TensorBatch {
  int num_tensors;
  int tensor_stride;                 // row length of `pointers`
  int8_t operand_row[kNumOperands];  // row of each operand in `pointers`, -1 when the list is unused
  double* norms;                     // LAMB: [2 * num_tensors] sums of squares, else nullptr
  int64_t numel[kBatchTensors];
  int32_t first_chunk[kBatchTensors];  // the tensor's chunk that its first block in this batch updates
  int16_t first_block[kBatchTensors];  // that block's index in the grid
  uint8_t block_tensor[kBatchBlocks];  // tensor of each block
  void* pointers[kBatchPointers];      // pointers[operand_row[op] * tensor_stride + tensor]

  template <typename T>
  __host__ __device__ T* pointer(Operand op, int tensor) const {
    const int row = operand_row[op];
    return row < 0 ? nullptr : static_cast<T*>(pointers[row * tensor_stride + tensor]);
  }
};

struct UpdateKernelArgs {
  StepArgs step;
  TensorBatch batch;
};
static_assert(sizeof(UpdateKernelArgs) <= kKernelParamBytes,
              "the update kernel's arguments must fit the 4 KB parameter space of CUDA < 12.1");

// ---- per-element math ----------------------------------------------------------------------

// Each of these rounds once. nvcc contracts a * b + c into an FMA by default (setup.py passes
// -fmad=true), whereas the rules say where torch fuses (M::fma) and the CPU kernel is compiled with
// -ffp-contract=off; routing + - * / through the _rn intrinsics, which are never contracted, keeps
// the CUDA step bit-identical to the CPU one instead of depending on the compiler's choices.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ float abs_exact(float a) { return fabsf(a); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ double abs_exact(double a) { return fabs(a); }

// The value type V of the rules on CUDA: one float (double for fp64) per thread, whose operators
// round each result (see above).
template <typename T>
struct Unfused {
  T x;
};
template <typename T>
__device__ __forceinline__ Unfused<T> operator+(Unfused<T> a, Unfused<T> b) { return {add_rn(a.x, b.x)}; }
template <typename T>
__device__ __forceinline__ Unfused<T> operator-(Unfused<T> a, Unfused<T> b) { return {sub_rn(a.x, b.x)}; }
template <typename T>
__device__ __forceinline__ Unfused<T> operator*(Unfused<T> a, Unfused<T> b) { return {mul_rn(a.x, b.x)}; }
template <typename T>
__device__ __forceinline__ Unfused<T> operator/(Unfused<T> a, Unfused<T> b) { return {div_rn(a.x, b.x)}; }

// The math policy M of optim_rules.h for one element per thread.
template <typename T>
struct ScalarMath {
  using V = Unfused<T>;
  static __device__ __forceinline__ V splat(T s) { return {s}; }
  static __device__ __forceinline__ V sqrt(V a) { return {sqrt_rn(a.x)}; }
  static __device__ __forceinline__ V abs(V a) { return {abs_exact(a.x)}; }
  // NaN-propagating, as torch.maximum and the CPU kernel's at::vec::maximum (fmaxf would drop the
  // NaN); on ties it returns b, as x86 maxps does.
  static __device__ __forceinline__ V max(V a, V b) { return {(a.x > b.x || isnan(a.x)) ? a.x : b.x}; }
  static __device__ __forceinline__ V neg(V a) { return {-a.x}; }
  static __device__ __forceinline__ V fma(V a, V b, V c) { return {fma_rn(a.x, b.x, c.x)}; }
  static __device__ __forceinline__ V fnma(V a, V b, V c) { return {fma_rn(-a.x, b.x, c.x)}; }
};

// ---- per-tensor scalars --------------------------------------------------------------------

// The coefficients of `tensor` for this step, as the CPU kernel's step_impl computes them: the
// counters are read, not written (see the header comment), and advanced in the same float
// arithmetic by advance_step_counters_kernel.
template <typename T>
__device__ Coeffs<T> tensor_coeffs(Rule rule, int pass, const Hyper& h, const TensorBatch& batch, int tensor) {
  double step = 0, mu = 0, mu_next = 0;
  float mu_product = 1.0f;
  if (const float* counter = batch.pointer<const float>(kStep, tensor)) step = double(*counter + 1.0f);
  if (rule == Rule::kNAdam) {
    mu = nadam_mu(h, step);
    mu_next = nadam_mu(h, step + 1);
    mu_product = *batch.pointer<const float>(kMuProduct, tensor) * static_cast<float>(mu);
  }
  Coeffs<T> c = make_coeffs<T>(rule, h, step, mu, mu_next, mu_product);
  if (rule == Rule::kLAMB && pass == 1)
    c.neg_lr_trust = T(-h.lr * lamb_trust_ratio(batch.norms[2 * tensor], batch.norms[2 * tensor + 1]));
  return c;
}

// Sums v[0] and v[1] over the block; the totals are valid in thread 0.
__device__ __forceinline__ void block_sum_pair(double (&v)[2]) {
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ double warp_sums[2][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    if (lane == 0) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    v[k] = lane < kWarps ? warp_sums[k][lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
}

// ---- one chunk -----------------------------------------------------------------------------

// The operands of one chunk, already offset to its first element, and the rule applied to them.
template <typename param_t, typename state_t, Rule kRule, int kPass>
struct ChunkUpdate {
  using T = cuda::math_t<param_t>;
  static constexpr int kStates = state_count(kRule);
  static constexpr bool kLambNormPass = kRule == Rule::kLAMB && kPass == 0;   // reads p, writes moments
  static constexpr bool kLambApplyPass = kRule == Rule::kLAMB && kPass == 1;  // reads p and moments
  static constexpr bool kReadsGrad = !kLambApplyPass;
  static constexpr bool kWritesParam = !kLambNormPass;
  static constexpr bool kWritesStates = !kLambApplyPass;
  // The storage pairs whose state type differs from the param type are the fp32-master ones.
  static constexpr bool kMasterWeights = !std::is_same_v<param_t, state_t>;

  const Hyper* hyper;
  Coeffs<T> coeffs;
  param_t* param;
  const param_t* grad;
  state_t* state[kStates];
  float* master;  // fp32 master weights when kMasterWeights, else nullptr
  bool scale_grads;
  T grad_scale;
  T acc0 = T(0), acc1 = T(0);  // LAMB pass 0: this thread's sums of p^2 and update^2

  __device__ bool all_aligned() const {
    bool ok = cuda::is_aligned<kIlp>(param) && cuda::is_aligned<kIlp>(grad) && cuda::is_aligned<kIlp>(master);
#pragma unroll
    for (int k = 0; k < kStates; ++k) ok = ok && cuda::is_aligned<kIlp>(state[k]);
    return ok;
  }

  // Element j of the registers through the rule.
  __device__ __forceinline__ void apply(T& p, T g, T (&s)[kStates][kIlp], int j) {
    using V = Unfused<T>;
    V vp{p}, vg{g}, acc_p{acc0}, acc_u{acc1};
    V vs[kMaxStates] = {};
#pragma unroll
    for (int k = 0; k < kStates; ++k) vs[k] = V{s[k][j]};
    if (scale_grads) vg = vg / V{grad_scale};
    apply_rule<ScalarMath<T>>(kRule, kPass, *hyper, coeffs, vp, vg, vs[0], vs[1], vs[2], acc_p, acc_u);
    p = vp.x;
#pragma unroll
    for (int k = 0; k < kStates; ++k) s[k][j] = vs[k].x;
    acc0 = acc_p.x;
    acc1 = acc_u.x;
  }

  // Elements [i, i + kIlp), one vector access per operand (all_aligned() must hold).
  __device__ __forceinline__ void update_vector(int i) {
    T p[kIlp], g[kIlp] = {}, s[kStates][kIlp] = {};
    if constexpr (kMasterWeights) {
      cuda::load_vector<kIlp>(master + i, p);
    } else {
      cuda::load_vector<kIlp>(param + i, p);
    }
    if constexpr (kReadsGrad) cuda::load_vector<kIlp>(grad + i, g);
#pragma unroll
    for (int k = 0; k < kStates; ++k)
      if (state[k]) cuda::load_vector<kIlp>(state[k] + i, s[k]);
#pragma unroll
    for (int j = 0; j < kIlp; ++j) apply(p[j], g[j], s, j);
    if constexpr (kWritesParam) {
      if constexpr (kMasterWeights) cuda::store_vector<kIlp>(master + i, p);
      cuda::store_vector<kIlp>(param + i, p);
    }
    if constexpr (kWritesStates) {
#pragma unroll
      for (int k = 0; k < kStates; ++k)
        if (state[k]) cuda::store_vector<kIlp>(state[k] + i, s[k]);
    }
  }

  // Elements i + j * kBlockThreads (j < kIlp) that are below n: neighbouring threads touch
  // neighbouring elements, so each access is coalesced even without vectors.
  __device__ __forceinline__ void update_strided(int i, int n) {
    T p[kIlp] = {}, g[kIlp] = {}, s[kStates][kIlp] = {};
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int e = i + j * kBlockThreads;
      if (e >= n) continue;
      if constexpr (kMasterWeights) {
        p[j] = master[e];
      } else {
        p[j] = cuda::to_math(param[e]);
      }
      if constexpr (kReadsGrad) g[j] = cuda::to_math(grad[e]);
#pragma unroll
      for (int k = 0; k < kStates; ++k)
        if (state[k]) s[k][j] = cuda::to_math(state[k][e]);
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j)
      if (i + j * kBlockThreads < n) apply(p[j], g[j], s, j);
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int e = i + j * kBlockThreads;
      if (e >= n) continue;
      if constexpr (kWritesParam) {
        if constexpr (kMasterWeights) master[e] = p[j];
        param[e] = cuda::from_math<param_t>(p[j]);
      }
      if constexpr (kWritesStates) {
#pragma unroll
        for (int k = 0; k < kStates; ++k)
          if (state[k]) state[k][e] = cuda::from_math<state_t>(s[k][j]);
      }
    }
  }
};

// One block updates one chunk of one tensor with rule kRule (LAMB: pass kPass).
template <typename param_t, typename state_t, Rule kRule, int kPass>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_update_kernel(const __grid_constant__ UpdateKernelArgs args) {
  using Update = ChunkUpdate<param_t, state_t, kRule, kPass>;
  using T = typename Update::T;
  const StepArgs& step = args.step;
  const TensorBatch& batch = args.batch;
  if (step.found_inf != nullptr && *step.found_inf != 0.0f) return;

  const int tensor = batch.block_tensor[blockIdx.x];
  const int64_t chunk = batch.first_chunk[tensor] + (static_cast<int>(blockIdx.x) - batch.first_block[tensor]);
  const int64_t begin = chunk * kChunkElements;
  const int64_t remaining = batch.numel[tensor] - begin;
  const int n = static_cast<int>(remaining < kChunkElements ? remaining : kChunkElements);

  __shared__ Coeffs<T> shared_coeffs;
  if (threadIdx.x == 0) shared_coeffs = tensor_coeffs<T>(kRule, kPass, step.hyper, batch, tensor);
  __syncthreads();

  Update update;
  update.hyper = &step.hyper;
  update.coeffs = shared_coeffs;
  update.param = batch.pointer<param_t>(kParam, tensor) + begin;
  const param_t* grad = batch.pointer<const param_t>(kGrad, tensor);
  update.grad = grad ? grad + begin : nullptr;
#pragma unroll
  for (int k = 0; k < Update::kStates; ++k) {
    state_t* s = batch.pointer<state_t>(static_cast<Operand>(kState0 + k), tensor);
    update.state[k] = s ? s + begin : nullptr;
  }
  float* master = batch.pointer<float>(kMaster, tensor);
  update.master = master ? master + begin : nullptr;
  update.scale_grads = step.grad_scale != nullptr;
  update.grad_scale = update.scale_grads ? T(*step.grad_scale) : T(1);

  int strided_from = 0;
  if (update.all_aligned()) {
    const int n_vector = n - n % kIlp;
    for (int i = threadIdx.x * kIlp; i < n_vector; i += kBlockThreads * kIlp) update.update_vector(i);
    strided_from = n_vector;
  }
  for (int i = strided_from; i < n; i += kBlockThreads * kIlp) update.update_strided(i + threadIdx.x, n);

  if constexpr (Update::kLambNormPass) {
    double sums[2] = {double(update.acc0), double(update.acc1)};
    block_sum_pair(sums);
    if (threadIdx.x == 0) {
      atomicAdd(&batch.norms[2 * tensor], sums[0]);
      atomicAdd(&batch.norms[2 * tensor + 1], sums[1]);
    }
  }
}

// ---- host side -----------------------------------------------------------------------------

// Launches the update kernel of (kRule, kPass) over every tensor of the step, as many batches as
// the lists need.
template <typename param_t, typename state_t, Rule kRule, int kPass>
cudaError_t launch_update_batches(const MultiTensorParams& mt, cudaStream_t stream) {
  using Update = ChunkUpdate<param_t, state_t, kRule, kPass>;
  UpdateKernelArgs args{};
  args.step = StepArgs{mt.hyper, mt.grad_scale, mt.found_inf};
  TensorBatch& batch = args.batch;

  bool present[kNumOperands] = {};
  present[kParam] = true;
  present[kGrad] = Update::kReadsGrad;
  for (int k = 0; k < Update::kStates; ++k) present[kState0 + k] = mt.states[k] != nullptr;
  present[kMaster] = mt.master != nullptr;
  present[kStep] = mt.steps != nullptr;
  present[kMuProduct] = kRule == Rule::kNAdam;
  if (kRule == Rule::kNAdam && mt.mu_products == nullptr) return cudaErrorInvalidValue;
  if (kRule == Rule::kLAMB && mt.norms == nullptr) return cudaErrorInvalidValue;
  if (Update::kMasterWeights != (mt.master != nullptr)) return cudaErrorInvalidValue;
  int rows = 0;
  for (int op = 0; op < kNumOperands; ++op) batch.operand_row[op] = present[op] ? static_cast<int8_t>(rows++) : -1;
  batch.tensor_stride = std::min(kBatchTensors, kBatchPointers / rows);

  auto list_pointer = [&](int op, int64_t t) -> void* {
    switch (op) {
      case kParam: return mt.params[t];
      case kGrad: return const_cast<void*>(mt.grads[t]);
      case kMaster: return mt.master[t];
      case kStep: return mt.steps[t];
      case kMuProduct: return mt.mu_products[t];
      default: return mt.states[op - kState0][t];
    }
  };

  int num_blocks = 0;
  batch.num_tensors = 0;
  auto launch = [&]() -> cudaError_t {
    if (num_blocks > 0) {
      multi_tensor_update_kernel<param_t, state_t, kRule, kPass><<<num_blocks, kBlockThreads, 0, stream>>>(args);
      FASTDL_CUDA_CHECK(cudaGetLastError());
    }
    batch.num_tensors = 0;
    num_blocks = 0;
    return cudaSuccess;
  };

  for (int64_t t = 0; t < mt.num_tensors; ++t) {
    const int64_t chunks = cuda::ceil_div(mt.numels[t], kChunkElements);
    if (chunks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
    int64_t chunk = 0;
    do {
      if (batch.num_tensors == batch.tensor_stride || (num_blocks == kBatchBlocks && chunk < chunks))
        FASTDL_CUDA_CHECK(launch());
      const int local = batch.num_tensors++;
      if (local == 0) batch.norms = mt.norms ? mt.norms + 2 * t : nullptr;
      for (int op = 0; op < kNumOperands; ++op)
        if (present[op]) batch.pointers[batch.operand_row[op] * batch.tensor_stride + local] = list_pointer(op, t);
      batch.numel[local] = mt.numels[t];
      batch.first_chunk[local] = static_cast<int32_t>(chunk);
      batch.first_block[local] = static_cast<int16_t>(num_blocks);
      const int64_t take = std::min<int64_t>(chunks - chunk, kBatchBlocks - num_blocks);
      for (int64_t b = 0; b < take; ++b) batch.block_tensor[num_blocks++] = static_cast<uint8_t>(local);
      chunk += take;
    } while (chunk < chunks);
  }
  return launch();
}

}  // namespace multi_tensor

template <typename param_t, typename state_t>
cudaError_t launch_update_kernels(const MultiTensorParams& mt, cudaStream_t stream) {
  using multi_tensor::launch_update_batches;
  switch (mt.rule) {
    case Rule::kSGD: return launch_update_batches<param_t, state_t, Rule::kSGD, 0>(mt, stream);
    case Rule::kAdagrad: return launch_update_batches<param_t, state_t, Rule::kAdagrad, 0>(mt, stream);
    case Rule::kRMSprop: return launch_update_batches<param_t, state_t, Rule::kRMSprop, 0>(mt, stream);
    case Rule::kAdam: return launch_update_batches<param_t, state_t, Rule::kAdam, 0>(mt, stream);
    case Rule::kAdamax: return launch_update_batches<param_t, state_t, Rule::kAdamax, 0>(mt, stream);
    case Rule::kNAdam: return launch_update_batches<param_t, state_t, Rule::kNAdam, 0>(mt, stream);
    case Rule::kLAMB:
      FASTDL_CUDA_CHECK((launch_update_batches<param_t, state_t, Rule::kLAMB, 0>(mt, stream)));
      return launch_update_batches<param_t, state_t, Rule::kLAMB, 1>(mt, stream);
  }
  return cudaErrorInvalidValue;
}

// The storage pairs of the dispatch in optim_launch.cu, each instantiated in its own file so that
// they compile in parallel.
extern template cudaError_t launch_update_kernels<float, float>(const MultiTensorParams&, cudaStream_t);
extern template cudaError_t launch_update_kernels<double, double>(const MultiTensorParams&, cudaStream_t);
extern template cudaError_t launch_update_kernels<__nv_bfloat16, __nv_bfloat16>(const MultiTensorParams&,
                                                                                 cudaStream_t);
extern template cudaError_t launch_update_kernels<__nv_bfloat16, float>(const MultiTensorParams&, cudaStream_t);
extern template cudaError_t launch_update_kernels<__half, __half>(const MultiTensorParams&, cudaStream_t);
extern template cudaError_t launch_update_kernels<__half, float>(const MultiTensorParams&, cudaStream_t);

}  // namespace fastdl::optim
