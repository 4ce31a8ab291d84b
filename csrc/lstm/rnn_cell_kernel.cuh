// CUDA fused recurrent cells (LSTM, GRU, tanh/ReLU RNN), forward and backward. Torch-free: the
// CellFwdParams / CellBwdParams of lstm_params.h, raw pointers, launchers taking a cudaStream_t.
//
// One thread per (row, hidden unit): it reads the unit's G gate pre-activations from both GEMM outputs
// (columns j, H + j, ...: a warp reads 32 consecutive floats of each gate block, coalesced), adds the
// biases, applies the activations, updates the state and writes what the backward needs, exactly the
// math of the CPU cell (lstm_cell_cpu.h), in fp32 (fp64 for fp64). No unit depends on another, so the
// results are bit-identical from run to run. The GEMMs around it are cuBLAS's, called by the binding.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_simt.cuh"
#include "common/cuda_utils.cuh"
#include "lstm/lstm_params.h"
#include "lstm/rnn_cell_launch.h"

namespace fastdl::rnn {

constexpr int kCellThreads = 256;

struct CellFwdArgs {
  CellFwdParams p;
  CellFwdCopies copies;
};

struct CellBwdArgs {
  CellBwdParams p;
  const void* grad_h_add;  // [batch, H] added to grad_h (the layer's d output of the step), or nullptr
  int64_t grad_h_add_stride;
};

namespace cell_detail {

template <typename T>
__device__ __forceinline__ T tanh_(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return tanhf(x);
  } else {
    return tanh(x);
  }
}

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + expf(-x));
  } else {
    return 1.0 / (1.0 + exp(-x));
  }
}

template <typename T>
__device__ __forceinline__ const T* row(const void* base, int64_t stride, int64_t b) {
  return base ? static_cast<const T*>(base) + b * stride : nullptr;
}
template <typename T>
__device__ __forceinline__ T* row(void* base, int64_t stride, int64_t b) {
  return base ? static_cast<T*>(base) + b * stride : nullptr;
}

template <typename T>
__global__ void __launch_bounds__(kCellThreads) rnn_cell_fwd_kernel(const CellFwdArgs args) {
  const CellFwdParams& p = args.p;
  const CellFwdCopies& cp = args.copies;
  const int64_t H = p.hidden, n = p.batch * H;
  const T* b_ih = static_cast<const T*>(p.b_ih);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  for (int64_t idx = int64_t(blockIdx.x) * kCellThreads + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * kCellThreads) {
    const int64_t b = idx / H, j = idx % H;
    const T* ig = row<T>(p.igates, p.igates_stride, b);
    const T* hg = row<T>(p.hgates, p.hgates_stride, b);
    T* s = row<T>(p.saved, p.saved_stride, b);
    // x W_ih^T + b_ih and h W_hh^T + b_hh of gate block k at unit j.
    auto x_part = [&](int k) { return ig[k * H + j] + (b_ih ? b_ih[k * H + j] : T(0)); };
    auto h_part = [&](int k) { return hg[k * H + j] + (b_hh ? b_hh[k * H + j] : T(0)); };
    T hy;
    if (cp.h_prev) row<T>(cp.h_prev, cp.h_prev_stride, b)[j] = row<T>(p.h_prev, p.h_prev_stride, b)[j];
    if (p.mode == Mode::kLSTM) {
      const T i = sigmoid(x_part(0) + h_part(0));
      const T f = sigmoid(x_part(1) + h_part(1));
      const T g = tanh_(x_part(2) + h_part(2));
      const T o = sigmoid(x_part(3) + h_part(3));
      const T c0 = row<T>(p.c_prev, p.c_prev_stride, b)[j];  // read before c_out (may alias) is written
      const T c = f * c0 + i * g;
      row<T>(p.c_out, p.c_out_stride, b)[j] = c;
      hy = o * tanh_(c);
      if (s) s[j] = i, s[H + j] = f, s[2 * H + j] = g, s[3 * H + j] = o;
      if (cp.c_prev) row<T>(cp.c_prev, cp.c_prev_stride, b)[j] = c0;
      if (cp.c_out) row<T>(cp.c_out, cp.c_out_stride, b)[j] = c;
    } else if (p.mode == Mode::kGRU) {
      const T r = sigmoid(x_part(0) + h_part(0));
      const T z = sigmoid(x_part(1) + h_part(1));
      const T hn = h_part(2);
      const T nn = tanh_(x_part(2) + r * hn);
      const T hp = row<T>(p.h_prev, p.h_prev_stride, b)[j];
      hy = nn + z * (hp - nn);  // (1 - z) n + z h, as torch writes it
      if (s) s[j] = r, s[H + j] = z, s[2 * H + j] = nn, s[3 * H + j] = hn;
    } else {
      const T pre = x_part(0) + h_part(0);
      hy = p.mode == Mode::kRNNTanh ? tanh_(pre) : (pre > T(0) ? pre : T(0));
      if (s) s[j] = hy;
    }
    row<T>(p.h_out, p.h_out_stride, b)[j] = hy;
    if (cp.h_out) row<T>(cp.h_out, cp.h_out_stride, b)[j] = hy;
  }
}

template <typename T>
__global__ void __launch_bounds__(kCellThreads) rnn_cell_bwd_kernel(const CellBwdArgs args) {
  const CellBwdParams& p = args.p;
  const int64_t H = p.hidden, n = p.batch * H;
  const T one(1);
  for (int64_t idx = int64_t(blockIdx.x) * kCellThreads + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * kCellThreads) {
    const int64_t b = idx / H, j = idx % H;
    const T* gh = row<T>(p.grad_h, p.grad_h_stride, b);
    const T* gadd = row<T>(args.grad_h_add, args.grad_h_add_stride, b);
    const T dh = (gh ? gh[j] : T(0)) + (gadd ? gadd[j] : T(0));
    const T* s = row<T>(p.saved, p.saved_stride, b);
    T* dgx = row<T>(p.grad_igates, p.grad_igates_stride, b);
    if (p.mode == Mode::kLSTM) {
      const T* gc = row<T>(p.grad_c, p.grad_c_stride, b);
      const T i = s[j], f = s[H + j], g = s[2 * H + j], o = s[3 * H + j];
      const T tc = tanh_(row<T>(p.c_out, p.c_out_stride, b)[j]);
      const T cp = row<T>(p.c_prev, p.c_prev_stride, b)[j];
      const T dc = (gc ? gc[j] : T(0)) + dh * o * (one - tc * tc);  // read before grad_c_prev (may alias)
      dgx[j] = (dc * g) * (i * (one - i));
      dgx[H + j] = (dc * cp) * (f * (one - f));
      dgx[2 * H + j] = (dc * i) * (one - g * g);
      dgx[3 * H + j] = (dh * tc) * (o * (one - o));
      row<T>(p.grad_c_prev, p.grad_c_prev_stride, b)[j] = dc * f;
    } else if (p.mode == Mode::kGRU) {
      T* dgh = row<T>(p.grad_hgates, p.grad_hgates_stride, b);
      const T r = s[j], z = s[H + j], nn = s[2 * H + j], hn = s[3 * H + j];
      const T hp = row<T>(p.h_prev, p.h_prev_stride, b)[j];
      const T dn = (dh * (one - z)) * (one - nn * nn);
      const T dz = (dh * (hp - nn)) * (z * (one - z));
      const T dr = (dn * hn) * (r * (one - r));
      dgx[j] = dr, dgx[H + j] = dz, dgx[2 * H + j] = dn;
      dgh[j] = dr, dgh[H + j] = dz, dgh[2 * H + j] = dn * r;
      row<T>(p.grad_h_prev, p.grad_h_prev_stride, b)[j] = dh * z;
    } else {
      const T y = s[j];
      dgx[j] = p.mode == Mode::kRNNTanh ? dh * (one - y * y) : (y > T(0) ? dh : T(0));
    }
  }
}

inline unsigned cell_blocks(int64_t n) {
  const int64_t blocks = (n + kCellThreads - 1) / kCellThreads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

}  // namespace cell_detail

template <typename T>
cudaError_t launch_cell_fwd(const CellFwdParams& p, const CellFwdCopies& copies, cudaStream_t stream) {
  return cuda::launch_kernel(&cell_detail::rnn_cell_fwd_kernel<T>, dim3(cell_detail::cell_blocks(p.batch * p.hidden)),
                             kCellThreads, 0, stream, CellFwdArgs{p, copies});
}

template <typename T>
cudaError_t launch_cell_bwd(const CellBwdParams& p, const void* grad_h_add, int64_t grad_h_add_stride,
                            cudaStream_t stream) {
  return cuda::launch_kernel(&cell_detail::rnn_cell_bwd_kernel<T>, dim3(cell_detail::cell_blocks(p.batch * p.hidden)),
                             kCellThreads, 0, stream, CellBwdArgs{p, grad_h_add, grad_h_add_stride});
}

}  // namespace fastdl::rnn
