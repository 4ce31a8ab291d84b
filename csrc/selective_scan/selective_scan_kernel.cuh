// CUDA selective scan: forward, backward and the one-step decoding update. Torch-free: params structs
// of selective_scan_params.h, raw pointers, launchers taking a cudaStream_t.
//
// Design (after mamba-ssm's selective_scan kernels: one block per (batch, channel), a block scan over
// L per state): a block of kScanThreads threads walks the sequence in passes of kScanChunk = 1024 steps,
// thread j owning the kScanItems consecutive steps [8j, 8j + 8) of the pass. For each state n the
// recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A[n]), b_t = delta_t B_t[n] u_t) is an
// associative scan over the pairs (a_t, b_t): each thread composes its 8 pairs, a warp scan (shuffles)
// and a scan of the 4 warp totals (shared memory) give each thread the map from the state before the
// pass to the state before its steps, and the state after the pass carries into the next one. The
// state is fp32 whatever the input dtype. The output y_t = <C_t, h_t> + D u_t accumulates over n in
// registers. Every 64 steps (kCheckpointChunk) the forward stores h, as the CPU kernel does.
//
// The backward runs the passes in reverse. Per state it recomputes h inside the pass from the
// checkpoint at the pass start (1024 is a multiple of 64), then runs the adjoint recurrence in
// reverse, q_t = a_t (q_{t+1} + C_t dy_t) (q_{t+1} is dL/dh_t minus the C_t dy_t term), as a reverse
// block scan of the pairs (a_t, a_t C_t dy_t). The gradient of h_t is g_t = q_{t+1} + C_t dy_t, and
//   du_t += g_t delta_t B_t,  ddelta_t += g_t (A a_t h_{t-1} + B_t u_t),  dA += g_t delta_t a_t h_{t-1},
//   dB_t = g_t delta_t u_t,   dC_t = dy_t h_t,   dinitial_state = q_0,   q_L = dlast_state.
// Per-channel sums (dA, dD, ddelta_bias, per-channel dB / dC) are summed per (batch, channel) in a fixed
// order and then over batch by a second kernel: deterministic. Input-dependent dB / dC are shared by the
// channels of a group and are accumulated with fp32 atomics (run-to-run order may differ when a group
// has more than one channel), then converted to the input dtype.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_simt.cuh"
#include "common/cuda_utils.cuh"
#include "selective_scan/selective_scan_params.h"

namespace fastdl::selective_scan {

constexpr int kScanThreads = 128;
constexpr int kScanWarps = kScanThreads / 32;
constexpr int kScanItems = 8;                             // consecutive steps per thread
constexpr int kScanChunk = kScanThreads * kScanItems;     // steps per pass
static_assert(kScanChunk % kCheckpointChunk == 0, "a pass starts at a checkpoint");
static_assert(kCheckpointChunk % kScanItems == 0, "a checkpoint falls between two threads' steps");
constexpr float kLog2e = 1.4426950408889634f;

// The CUDA kernels keep the parameters and states in fp32; the binding rejects fp64.
// Scratch of the backward (floats), carved by the launcher: per (batch, channel) partial sums, and the
// fp32 accumulators of input-dependent dB / dC.
struct ScanBwdArgs {
  ScanBwdParams p;
  float* dA_part = nullptr;   // [batch, dim, dstate]
  float* dB_part = nullptr;   // [batch, dim, dstate], per-channel B only
  float* dC_part = nullptr;   // [batch, dim, dstate], per-channel C only
  float* dD_part = nullptr;   // [batch, dim]
  float* ddb_part = nullptr;  // [batch, dim]
  float* dB_acc = nullptr;    // [batch, n_groups, dstate, L], input-dependent B only, zeroed first
  float* dC_acc = nullptr;    // [batch, n_groups, dstate, L], input-dependent C only, zeroed first
};

namespace scan_detail {

using cuda::shfl_down;
using cuda::shfl_up;
using cuda::shfl_xor;
using cuda::sld;
using cuda::sst;
using cuda::to_math;

// The affine map h -> a h + b.
struct Pair {
  float a, b;
};

// `first`, then `then`.
__device__ __forceinline__ Pair compose(Pair first, Pair then) { return {first.a * then.a, then.a * first.b + then.b}; }

// Exclusive scan in thread order: the composition of the maps of threads 0 .. tid-1 (identity for
// thread 0). tot: kScanWarps float2 of shared memory, not read or written by the block's previous call
// (callers alternate two buffers: the barrier inside orders the call after next).
__device__ __forceinline__ Pair block_scan_fwd(Pair agg, float2* tot) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Pair inc = agg;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float pa = shfl_up(inc.a, off), pb = shfl_up(inc.b, off);
    if (lane >= off) inc = compose(Pair{pa, pb}, inc);
  }
  const float ea = shfl_up(inc.a, 1), eb = shfl_up(inc.b, 1);
  if (lane == 31) sst(tot + warp, make_float2(inc.a, inc.b));
  __syncthreads();
  Pair pre{1.0f, 0.0f};
  for (int w = 0; w < warp; ++w) {
    const float2 t = sld(tot + w);
    pre = compose(pre, Pair{t.x, t.y});
  }
  return lane == 0 ? pre : compose(pre, Pair{ea, eb});
}

// Exclusive scan in reverse thread order: the composition of the maps of threads kScanThreads-1 down
// to tid+1 (identity for the last thread). Same contract on tot.
__device__ __forceinline__ Pair block_scan_rev(Pair agg, float2* tot) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Pair inc = agg;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float pa = shfl_down(inc.a, off), pb = shfl_down(inc.b, off);
    if (lane + off < 32) inc = compose(Pair{pa, pb}, inc);
  }
  const float ea = shfl_down(inc.a, 1), eb = shfl_down(inc.b, 1);
  if (lane == 0) sst(tot + warp, make_float2(inc.a, inc.b));
  __syncthreads();
  Pair pre{1.0f, 0.0f};
  for (int w = kScanWarps - 1; w > warp; --w) {
    const float2 t = sld(tot + w);
    pre = compose(pre, Pair{t.x, t.y});
  }
  return lane == 31 ? pre : compose(pre, Pair{ea, eb});
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += shfl_xor(v, m);
  return v;
}

// x[t0 .. t0 + kScanItems) of a row with step stride `stride`, as fp32, 0 past L. A thread's 8 steps are
// consecutive: with stride 1 and an aligned address they load as one vector (16 B for bf16 / fp16, two for
// fp32), so a warp reads 256 consecutive elements: every sector fully used.
template <typename T>
__device__ __forceinline__ void load_steps(const T* x, int64_t stride, int64_t t0, int64_t L,
                                           float (&out)[kScanItems]) {
  if (stride == 1 && t0 + kScanItems <= L && cuda::is_aligned<kScanItems>(x + t0)) {
    cuda::load_vector<kScanItems>(x + t0, out);
    return;
  }
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) out[i] = t0 + i < L ? to_math(x[(t0 + i) * stride]) : 0.0f;
}

// out[t0 .. min(t0 + kScanItems, L)) of a contiguous row, vectorized when whole and aligned.
template <typename T>
__device__ __forceinline__ void store_steps(T* out, int64_t t0, int64_t L, const float (&v)[kScanItems]) {
  if (t0 + kScanItems <= L && cuda::is_aligned<kScanItems>(out + t0)) {
    cuda::store_vector<kScanItems>(out + t0, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < kScanItems; ++i)
    if (t0 + i < L) out[t0 + i] = cuda::from_math<T>(v[i]);
}

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The per-(batch, channel) view of the params.
template <typename T>
struct Channel {
  int64_t b, d, g;
  const T *u, *delta, *z, *Bv, *Cv;  // Bv / Cv: input-dependent B / C of the group, else nullptr
  const float *A, *Bw, *Cw;          // Bw / Cw: per-channel B / C rows, else nullptr
  float D, bias;

  __device__ Channel(const ScanParams& p, int64_t b_, int64_t d_) : b(b_), d(d_) {
    g = d / (p.dim / p.n_groups);
    u = static_cast<const T*>(p.u) + b * p.u_batch_stride + d * p.u_d_stride;
    delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + d * p.delta_d_stride;
    z = p.z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + d * p.z_d_stride : nullptr;
    A = static_cast<const float*>(p.A) + d * p.A_d_stride;
    Bv = p.is_variable_B ? static_cast<const T*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride : nullptr;
    Cv = p.is_variable_C ? static_cast<const T*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride : nullptr;
    Bw = p.is_variable_B ? nullptr : static_cast<const float*>(p.B) + d * p.B_d_stride;
    Cw = p.is_variable_C ? nullptr : static_cast<const float*>(p.C) + d * p.C_d_stride;
    D = p.D ? static_cast<const float*>(p.D)[d * p.D_stride] : 0.0f;
    bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d * p.delta_bias_stride] : 0.0f;
  }

  // B_t[n] / C_t[n] of this thread's steps t0 .. t0 + kScanItems - 1 (0 past the end).
  __device__ __forceinline__ void load_bc(const ScanParams& p, int64_t n, int64_t t0, float (&Bt)[kScanItems],
                                          float (&Ct)[kScanItems]) const {
    if (Bv) {
      load_steps(Bv + n * p.B_n_stride, p.B_l_stride, t0, p.seqlen, Bt);
    } else {
      const float bw = Bw[n * p.B_n_stride];
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) Bt[i] = bw;
    }
    if (Cv) {
      load_steps(Cv + n * p.C_n_stride, p.C_l_stride, t0, p.seqlen, Ct);
    } else {
      const float cw = Cw[n * p.C_n_stride];
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) Ct[i] = cw;
    }
  }

  // u and delta (after bias and softplus) of the thread's steps; 0 past the end, which makes their
  // pairs (a, b) = (1, 0): the identity, so padding carries the state unchanged.
  __device__ __forceinline__ void load_u_delta(const ScanParams& p, int64_t t0, float (&uv)[kScanItems],
                                               float (&dv)[kScanItems], float (&draw)[kScanItems]) const {
    load_steps(u, p.u_l_stride, t0, p.seqlen, uv);
    load_steps(delta, p.delta_l_stride, t0, p.seqlen, draw);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      if (t0 + i < p.seqlen) {
        draw[i] += bias;
        dv[i] = p.delta_softplus ? softplus(draw[i]) : draw[i];
      } else {
        dv[i] = 0.0f, draw[i] = 0.0f;
      }
    }
  }
};

// Grid (dim, batch), kScanThreads threads; shared: 2 x kScanWarps float2 + 2 x dstate floats.
template <typename T>
__global__ void __launch_bounds__(kScanThreads) selective_scan_fwd_kernel(const ScanParams p) {
  float2* tot = reinterpret_cast<float2*>(cuda::dynamic_smem());  // [2][kScanWarps]
  float* running = reinterpret_cast<float*>(tot + 2 * kScanWarps);  // [2][dstate]: h before the pass
  const int tid = threadIdx.x;
  const int64_t d = blockIdx.x, b = blockIdx.y, N = p.dstate, L = p.seqlen;
  const Channel<T> ch(p, b, d);
  const int64_t row = b * p.dim + d;
  float* ckpt = static_cast<float*>(p.checkpoints) + row * p.n_chunks * N;  // [n_chunks, dstate]

  for (int64_t n = tid; n < N; n += kScanThreads) {
    const float* x0 = static_cast<const float*>(p.initial_state);
    const float h0 = x0 ? x0[b * p.x0_batch_stride + d * p.x0_d_stride + n * p.x0_n_stride] : 0.0f;
    sst(running + n, h0);
    if (L > 0) ckpt[n] = h0;
  }
  __syncthreads();

  int par = 0, step = 0;
  for (int64_t c0 = 0; c0 < L; c0 += kScanChunk, par ^= 1) {
    const int64_t t0 = c0 + int64_t(tid) * kScanItems;
    float uv[kScanItems], dv[kScanItems], draw[kScanItems], y[kScanItems];
    ch.load_u_delta(p, t0, uv, dv, draw);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) y[i] = ch.D * uv[i];

    for (int64_t n = 0; n < N; ++n, ++step) {
      float Bt[kScanItems], Ct[kScanItems];
      ch.load_bc(p, n, t0, Bt, Ct);
      const float a2 = ch.A[n * p.A_n_stride] * kLog2e;  // exp(delta A) = 2^(delta A log2 e)
      Pair e[kScanItems];
      Pair agg{1.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        e[i] = Pair{exp2f(dv[i] * a2), dv[i] * uv[i] * Bt[i]};
        agg = compose(agg, e[i]);
      }
      const Pair pre = block_scan_fwd(agg, tot + (step & 1) * kScanWarps);
      float h = pre.a * sld(running + par * N + n) + pre.b;
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        h = e[i].a * h + e[i].b;
        y[i] += Ct[i] * h;
        const int64_t t = t0 + i;
        if ((t + 1) % kCheckpointChunk == 0 && t + 1 < L) ckpt[((t + 1) / kCheckpointChunk) * N + n] = h;
      }
      if (tid == kScanThreads - 1) sst(running + (par ^ 1) * N + n, h);  // padding steps are the identity
    }

    if (ch.z) {
      float zv[kScanItems];
      load_steps(ch.z, p.z_l_stride, t0, L, zv);
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) y[i] *= zv[i] * sigmoid(zv[i]);
    }
    store_steps(static_cast<T*>(p.out) + row * L, t0, L, y);
  }
  __syncthreads();
  float* last = static_cast<float*>(p.last_state) + row * N;
  for (int64_t n = tid; n < N; n += kScanThreads) last[n] = sld(running + par * N + n);
}

// Grid (dim, batch), kScanThreads threads; shared memory: see scan_bwd_smem_bytes.
template <typename T>
__global__ void __launch_bounds__(kScanThreads) selective_scan_bwd_kernel(const ScanBwdArgs args) {
  const ScanBwdParams& p = args.p;
  const int64_t N = p.dstate, L = p.seqlen;
  float2* tot_f = reinterpret_cast<float2*>(cuda::dynamic_smem());  // [2][kScanWarps]
  float2* tot_r = tot_f + 2 * kScanWarps;                            // [2][kScanWarps]
  float* carry = reinterpret_cast<float*>(tot_r + 2 * kScanWarps);   // [2][dstate]: q after the pass
  float* sum_dA = carry + 2 * N;                                     // [kScanWarps][dstate] per-warp sums
  float* sum_dB = sum_dA + kScanWarps * N;
  float* sum_dC = sum_dB + kScanWarps * N;
  float* red = sum_dC + kScanWarps * N;                              // [2][kScanWarps]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const Channel<T> ch(p, b, d);
  const int64_t row = b * p.dim + d;
  const float* ckpt = static_cast<const float*>(p.checkpoints) + row * p.n_chunks * N;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + d * p.dout_d_stride;
  const int64_t acc_off = b * p.n_groups * N * L + ch.g * N * L;  // [batch, n_groups, dstate, L]

  for (int64_t n = tid; n < N; n += kScanThreads) {
    const float* dlast = static_cast<const float*>(p.dlast_state);
    sst(carry + n, dlast ? dlast[b * p.dlast_batch_stride + d * p.dlast_d_stride + n * p.dlast_n_stride] : 0.0f);
    for (int w = 0; w < kScanWarps; ++w) {
      sst(sum_dA + w * N + n, 0.0f);
      sst(sum_dB + w * N + n, 0.0f);
      sst(sum_dC + w * N + n, 0.0f);
    }
  }
  __syncthreads();

  float dD_acc = 0.0f, ddb_acc = 0.0f;
  int par = 0, step = 0;
  const int64_t n_pass = (L + kScanChunk - 1) / kScanChunk;
  for (int64_t pass = n_pass - 1; pass >= 0; --pass, par ^= 1) {
    const int64_t c0 = pass * kScanChunk, t0 = c0 + int64_t(tid) * kScanItems;
    float uv[kScanItems], dv[kScanItems], draw[kScanItems], y[kScanItems], dy[kScanItems], go[kScanItems];
    float du[kScanItems], ddv[kScanItems], zv[kScanItems];
    ch.load_u_delta(p, t0, uv, dv, draw);
    load_steps(dout, p.dout_l_stride, t0, L, go);
    if (ch.z) load_steps(ch.z, p.z_l_stride, t0, L, zv);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      dy[i] = ch.z ? go[i] * zv[i] * sigmoid(zv[i]) : go[i];
      y[i] = ch.D * uv[i];
      du[i] = ch.D * dy[i];
      ddv[i] = 0.0f;
    }

    for (int64_t n = 0; n < N; ++n, ++step) {
      float Bt[kScanItems], Ct[kScanItems];
      ch.load_bc(p, n, t0, Bt, Ct);
      const float An = ch.A[n * p.A_n_stride], a2 = An * kLog2e;
      // Recompute the states of the pass from its checkpoint.
      Pair e[kScanItems];
      Pair agg{1.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        e[i] = Pair{exp2f(dv[i] * a2), dv[i] * uv[i] * Bt[i]};
        agg = compose(agg, e[i]);
      }
      const Pair pre = block_scan_fwd(agg, tot_f + (step & 1) * kScanWarps);
      float hprev[kScanItems], hcur[kScanItems];
      float h = pre.a * ckpt[(c0 / kCheckpointChunk) * N + n] + pre.b;
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        hprev[i] = h;
        h = e[i].a * h + e[i].b;
        hcur[i] = h;
        y[i] += Ct[i] * h;
      }
      // Adjoint in reverse: q_t = a_t (q_{t+1} + C_t dy_t).
      Pair ragg{1.0f, 0.0f};
#pragma unroll
      for (int i = kScanItems - 1; i >= 0; --i) ragg = compose(ragg, Pair{e[i].a, e[i].a * Ct[i] * dy[i]});
      const Pair rpre = block_scan_rev(ragg, tot_r + (step & 1) * kScanWarps);
      float q = rpre.a * sld(carry + par * N + n) + rpre.b;
      float dA = 0.0f, dB = 0.0f, dC = 0.0f;
#pragma unroll
      for (int i = kScanItems - 1; i >= 0; --i) {
        const int64_t t = t0 + i;
        const float gh = q + Ct[i] * dy[i];  // dL/dh_t
        q = e[i].a * gh;
        if (t >= L) continue;
        ddv[i] += gh * (An * e[i].a * hprev[i] + Bt[i] * uv[i]);
        du[i] += gh * dv[i] * Bt[i];
        dA += gh * dv[i] * e[i].a * hprev[i];
        const float dBt = gh * dv[i] * uv[i], dCt = dy[i] * hcur[i];
        if (ch.Bv) {
          cuda::atomic_add(args.dB_acc + acc_off + n * L + t, dBt);
        } else {
          dB += dBt;
        }
        if (ch.Cv) {
          cuda::atomic_add(args.dC_acc + acc_off + n * L + t, dCt);
        } else {
          dC += dCt;
        }
      }
      if (tid == 0) sst(carry + (par ^ 1) * N + n, q);
      dA = warp_sum(dA);
      if (!ch.Bv) dB = warp_sum(dB);
      if (!ch.Cv) dC = warp_sum(dC);
      if (lane == 0) {  // each warp's lane 0 owns its row of the sums
        sst(sum_dA + warp * N + n, sld(sum_dA + warp * N + n) + dA);
        if (!ch.Bv) sst(sum_dB + warp * N + n, sld(sum_dB + warp * N + n) + dB);
        if (!ch.Cv) sst(sum_dC + warp * N + n, sld(sum_dC + warp * N + n) + dC);
      }
    }

    float dz[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      if (t0 + i >= L) {  // padding: nothing to add (its values are never stored)
        ddv[i] = 0.0f, dz[i] = 0.0f;
        continue;
      }
      dD_acc += dy[i] * uv[i];
      ddv[i] = p.delta_softplus ? ddv[i] * (draw[i] > 20.0f ? 1.0f : sigmoid(draw[i])) : ddv[i];
      ddb_acc += ddv[i];
      if (ch.z) {
        const float s = sigmoid(zv[i]);
        dz[i] = go[i] * y[i] * s * (1.0f + zv[i] * (1.0f - s));
      }
    }
    store_steps(static_cast<T*>(p.du) + row * L, t0, L, du);
    store_steps(static_cast<T*>(p.ddelta) + row * L, t0, L, ddv);
    if (p.dz) store_steps(static_cast<T*>(p.dz) + row * L, t0, L, dz);
  }

  dD_acc = warp_sum(dD_acc);
  ddb_acc = warp_sum(ddb_acc);
  if (lane == 0) {
    sst(red + warp, dD_acc);
    sst(red + kScanWarps + warp, ddb_acc);
  }
  __syncthreads();
  if (tid == 0) {
    float sD = 0.0f, sb = 0.0f;
    for (int w = 0; w < kScanWarps; ++w) sD += sld(red + w), sb += sld(red + kScanWarps + w);
    args.dD_part[row] = sD;
    args.ddb_part[row] = sb;
  }
  float* dx0 = static_cast<float*>(p.dinitial_state) + row * N;
  for (int64_t n = tid; n < N; n += kScanThreads) {
    dx0[n] = sld(carry + par * N + n);
    float sA = 0.0f, sB = 0.0f, sC = 0.0f;
    for (int w = 0; w < kScanWarps; ++w) {
      sA += sld(sum_dA + w * N + n);
      sB += sld(sum_dB + w * N + n);
      sC += sld(sum_dC + w * N + n);
    }
    args.dA_part[row * N + n] = sA;
    if (args.dB_part) args.dB_part[row * N + n] = sB;
    if (args.dC_part) args.dC_part[row * N + n] = sC;
  }
}

// out[i] = sum_b part[b * rows + i] for i < rows, summed in batch order (deterministic).
struct BatchSumArgs {
  const float* part;
  float* out;
  int64_t rows, batch;
};

static __global__ void __launch_bounds__(256) batch_sum_kernel(const BatchSumArgs a) {
  const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (i >= a.rows) return;
  float s = 0.0f;
  for (int64_t b = 0; b < a.batch; ++b) s += a.part[b * a.rows + i];
  a.out[i] = s;
}

template <typename T>
struct ConvertArgs {
  const float* in;
  T* out;
  int64_t n;
};

template <typename T>
__global__ void __launch_bounds__(256) convert_kernel(const ConvertArgs<T> a) {
  for (int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x; i < a.n; i += int64_t(gridDim.x) * 256)
    a.out[i] = cuda::from_math<T>(a.in[i]);
}

struct FillArgs {
  float* out;
  int64_t n;
};

static __global__ void __launch_bounds__(256) zero_kernel(const FillArgs a) {
  for (int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x; i < a.n; i += int64_t(gridDim.x) * 256) a.out[i] = 0.0f;
}

inline unsigned elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
}

// One decoding step: a warp per (batch, channel), lanes over the states; 4 warps per block.
constexpr int kUpdateThreads = 128;

template <typename T, typename S>
__global__ void __launch_bounds__(kUpdateThreads) selective_state_update_kernel(const StateUpdateParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kUpdateThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.dim) return;  // whole warps leave together
  const int64_t b = row / p.dim, d = row % p.dim, g = d / (p.dim / p.n_groups);
  const float x = to_math(static_cast<const T*>(p.x)[b * p.x_batch_stride + d * p.x_d_stride]);
  float dt = to_math(static_cast<const T*>(p.dt)[b * p.dt_batch_stride + d * p.dt_d_stride]);
  if (p.dt_bias) dt += static_cast<const float*>(p.dt_bias)[d * p.dt_bias_stride];
  if (p.dt_softplus) dt = softplus(dt);
  const float* A = static_cast<const float*>(p.A) + d * p.A_d_stride;
  const T* B = static_cast<const T*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
  const T* C = static_cast<const T*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
  S* state = static_cast<S*>(p.state) + b * p.state_batch_stride + d * p.state_d_stride;
  float acc = 0.0f;
  for (int64_t n = lane; n < p.dstate; n += 32) {
    const float h = exp2f(dt * A[n * p.A_n_stride] * kLog2e) * to_math(state[n * p.state_n_stride]) +
                    to_math(B[n * p.B_n_stride]) * (dt * x);
    state[n * p.state_n_stride] = cuda::from_math<S>(h);
    acc += h * to_math(C[n * p.C_n_stride]);  // the fp32 value, as the CPU kernel
  }
  acc = warp_sum(acc);
  if (lane != 0) return;
  float y = acc + (p.D ? static_cast<const float*>(p.D)[d * p.D_stride] : 0.0f) * x;
  if (p.z) {
    const float zz = to_math(static_cast<const T*>(p.z)[b * p.z_batch_stride + d * p.z_d_stride]);
    y *= zz * sigmoid(zz);
  }
  static_cast<T*>(p.out)[row] = cuda::from_math<T>(y);
}

}  // namespace scan_detail

inline int scan_fwd_smem_bytes(const ScanParams& p) {
  return static_cast<int>(2 * kScanWarps * sizeof(float2) + 2 * p.dstate * sizeof(float));
}

inline int scan_bwd_smem_bytes(const ScanParams& p) {
  return static_cast<int>(4 * kScanWarps * sizeof(float2) +
                          (2 * p.dstate + 3 * kScanWarps * p.dstate + 2 * kScanWarps) * sizeof(float));
}

// Floats of backward scratch that the launcher needs (see ScanBwdArgs).
inline int64_t scan_bwd_scratch_floats(const ScanBwdParams& p) {
  const int64_t rows = p.batch * p.dim, acc = p.batch * p.n_groups * p.dstate * p.seqlen;
  return rows * p.dstate * (1 + !p.is_variable_B + !p.is_variable_C) + 2 * rows + (p.is_variable_B ? acc : 0) +
         (p.is_variable_C ? acc : 0);
}

template <typename T>
cudaError_t launch_scan_fwd(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  return cuda::launch_kernel(&scan_detail::selective_scan_fwd_kernel<T>, grid, kScanThreads, scan_fwd_smem_bytes(p),
                             stream, p);
}

template <typename T>
cudaError_t launch_scan_bwd(const ScanBwdParams& p, float* scratch, cudaStream_t stream) {
  using namespace scan_detail;
  ScanBwdArgs a;
  a.p = p;
  const int64_t rows = p.batch * p.dim, acc = p.batch * p.n_groups * p.dstate * p.seqlen;
  float* s = scratch;
  a.dA_part = s, s += rows * p.dstate;
  if (!p.is_variable_B) a.dB_part = s, s += rows * p.dstate;
  if (!p.is_variable_C) a.dC_part = s, s += rows * p.dstate;
  a.dD_part = s, s += rows;
  a.ddb_part = s, s += rows;
  if (p.is_variable_B) a.dB_acc = s, s += acc;
  if (p.is_variable_C) a.dC_acc = s, s += acc;
  if (p.is_variable_B || p.is_variable_C) {
    const int64_t n = (p.is_variable_B + p.is_variable_C) * acc;  // the accumulators are adjacent
    float* first = p.is_variable_B ? a.dB_acc : a.dC_acc;
    FASTDL_CUDA_CHECK(
        cuda::launch_kernel(&zero_kernel, dim3(elementwise_blocks(n)), 256, 0, stream, FillArgs{first, n}));
  }
  const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
  FASTDL_CUDA_CHECK(
      cuda::launch_kernel(&selective_scan_bwd_kernel<T>, grid, kScanThreads, scan_bwd_smem_bytes(p), stream, a));

  // Sums over batch, conversions to the gradients' dtypes.
  const int64_t dn = p.dim * p.dstate;
  auto batch_sum = [&](const float* part, void* out, int64_t n) {
    return cuda::launch_kernel(&batch_sum_kernel, dim3(static_cast<unsigned>((n + 255) / 256)), 256, 0, stream,
                               BatchSumArgs{part, static_cast<float*>(out), n, p.batch});
  };
  FASTDL_CUDA_CHECK(batch_sum(a.dA_part, p.dA, dn));
  FASTDL_CUDA_CHECK(batch_sum(a.dD_part, p.dD, p.dim));
  FASTDL_CUDA_CHECK(batch_sum(a.ddb_part, p.ddelta_bias, p.dim));
  if (!p.is_variable_B) FASTDL_CUDA_CHECK(batch_sum(a.dB_part, p.dB, dn));
  if (!p.is_variable_C) FASTDL_CUDA_CHECK(batch_sum(a.dC_part, p.dC, dn));
  auto convert = [&](const float* in, void* out) {
    return cuda::launch_kernel(&convert_kernel<T>, dim3(elementwise_blocks(acc)), 256, 0, stream,
                               ConvertArgs<T>{in, static_cast<T*>(out), acc});
  };
  if (p.is_variable_B) FASTDL_CUDA_CHECK(convert(a.dB_acc, p.dB));
  if (p.is_variable_C) FASTDL_CUDA_CHECK(convert(a.dC_acc, p.dC));
  return cudaSuccess;
}

template <typename T, typename S>
cudaError_t launch_state_update(const StateUpdateParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim, per_block = scan_detail::kUpdateThreads / 32;
  const dim3 grid(static_cast<unsigned>((rows + per_block - 1) / per_block));
  return cuda::launch_kernel(&scan_detail::selective_state_update_kernel<T, S>, grid, scan_detail::kUpdateThreads, 0,
                             stream, p);
}

}  // namespace fastdl::selective_scan
