// The fused cell steps on CPU: one pass per row over the gate blocks, in at::vec registers.
//
// Forward reads igates, hgates and both biases, applies the gate activations and writes the new state
// and the saved activations; backward reads those and writes the pre-activation gradients. Each output
// element depends on its own column only, so rows x column blocks split across threads with results
// independent of the split (bit-identical run to run). sigmoid is torch's own vectorized exp (Sleef, 1 ulp)
// and a division; tanh is Sleef's 3.5-ulp version in fp32 (see tanh below), so the forward matches
// torch.nn.LSTM to a few ulp.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_utils.h"
#include "lstm/lstm_params.h"

namespace fastdl::rnn::cpu {

using fastdl::cpu::Vec;

template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}
template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t n) {
  n == Vec<T>::size() ? v.store(p) : v.store(p, n);
}
// tanh for the cells. fp32 on AVX-512 / AVX2: Sleef's 3.5-ulp tanh (Sleef_tanhf16_u35, in torch's own Sleef),
// ~6 ns per 16 lanes on a Zen 5 core against ~20 for the 1-ulp version at::vec's tanh() calls; measured max
// error 1.9 ulp over [-12, 12]. The LSTM forward takes two tanh per unit (g and tanh(c)), and at 1-ulp
// they were ~2/3 of the cell's time (perf) and the cell ~12% of the forward. fp64 (gradcheck) keeps 1 ulp.
template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return Vec<T>(Sleef_tanhf16_u35(x));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return Vec<T>(Sleef_tanhf8_u35(x));
#endif
  return x.tanh();
}
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}

// Runs fn(row, col_begin, col_end) over batch x hidden in blocks of kBlock columns, so that one row
// of a wide layer still splits across cores. Threads only take >= 32K hidden units each (~80 us of
// gate math for an LSTM): a cell of batch 32 x 512 units (~40 us) is not worth a fork/join, which on
// a loaded machine can wait a whole time slice for a descheduled thread.
template <typename Fn>
void parallel_rows(int64_t batch, int64_t hidden, const Fn& fn, bool parallel = true) {
  constexpr int64_t kBlock = 256;
  const int64_t nblk = (hidden + kBlock - 1) / kBlock;
  const int64_t tasks = batch * nblk;
  const int64_t grain = parallel ? std::max<int64_t>(1, 32768 / std::min(hidden, kBlock)) : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, j0 = (task % nblk) * kBlock;
      fn(b, j0, std::min(hidden, j0 + kBlock));
    }
  });
}

template <typename T>
struct Row {
  // Element (b, col) of a [rows, stride] matrix, or nullptr.
  static const T* at(const void* base, int64_t stride, int64_t b) {
    return base ? static_cast<const T*>(base) + b * stride : nullptr;
  }
  static T* at(void* base, int64_t stride, int64_t b) { return base ? static_cast<T*>(base) + b * stride : nullptr; }
};

// Row b, hidden units [j0, j1) of one forward cell step.
template <typename T>
inline void cell_forward_block(const CellFwdParams& p, int64_t b, int64_t j0, int64_t j1) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t H = p.hidden;
  const T* b_ih = static_cast<const T*>(p.b_ih);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  {
    // Gate k of unit j at ig[k * ks + j]: gate-major, or within the gate-blocked tile of j0's block.
    const int64_t gb = p.gate_block, ks = gb ? gb : H;
    const int64_t shift = gb ? (j0 / gb) * (num_gates(p.mode) - 1) * gb : 0;
    const T* ig = Row<T>::at(p.igates, p.igates_stride, b) + shift;
    const T* hg = Row<T>::at(p.hgates, p.hgates_stride, b) + shift;
    T* h = Row<T>::at(p.h_out, p.h_out_stride, b);
    T* s = Row<T>::at(p.saved, p.saved_stride, b);
    for (int64_t j = j0; j < j1; j += W) {
      const int64_t n = std::min(W, j1 - j);
      // x W_ih^T + b_ih and h W_hh^T + b_hh of gate block k, at columns j..j+n.
      auto x_part = [&](int k) {
        V v = load(ig + k * ks + j, n);
        return b_ih ? v + load(b_ih + k * H + j, n) : v;
      };
      auto h_part = [&](int k) {
        V v = load(hg + k * ks + j, n);
        return b_hh ? v + load(b_hh + k * H + j, n) : v;
      };
      if (p.mode == Mode::kLSTM) {
        const T* cp = Row<T>::at(p.c_prev, p.c_prev_stride, b);
        T* c = Row<T>::at(p.c_out, p.c_out_stride, b);
        const V i = sigmoid(x_part(0) + h_part(0));
        const V f = sigmoid(x_part(1) + h_part(1));
        const V g = cpu::tanh(x_part(2) + h_part(2));
        const V o = sigmoid(x_part(3) + h_part(3));
        const V cn = f * load(cp + j, n) + i * g;
        store(cn, c + j, n);
        store(o * cpu::tanh(cn), h + j, n);
        if (s) {
          store(i, s + j, n);
          store(f, s + H + j, n);
          store(g, s + 2 * H + j, n);
          store(o, s + 3 * H + j, n);
        }
      } else if (p.mode == Mode::kGRU) {
        const T* hp = Row<T>::at(p.h_prev, p.h_prev_stride, b);
        const V r = sigmoid(x_part(0) + h_part(0));
        const V z = sigmoid(x_part(1) + h_part(1));
        const V hn = h_part(2);
        const V nn = cpu::tanh(x_part(2) + r * hn);
        store(nn + z * (load(hp + j, n) - nn), h + j, n);  // (1 - z) * n + z * h, as torch writes it
        if (s) {
          store(r, s + j, n);
          store(z, s + H + j, n);
          store(nn, s + 2 * H + j, n);
          store(hn, s + 3 * H + j, n);
        }
      } else {
        const V pre = x_part(0) + h_part(0);
        const V hy = p.mode == Mode::kRNNTanh ? cpu::tanh(pre) : at::vec::maximum(pre, V(T(0)));
        store(hy, h + j, n);
        if (s) store(hy, s + j, n);
      }
    }
  }
}

// The fp32 LSTM cell of rows [m0, m0 + m) and one gate-blocked panel of kUnits units [j0, j0 + kUnits) with
// no b_hh (the layer passes b_ih + b_hh summed): cell_forward_block's arithmetic, in the same order, with the
// panel's 4 * kUnits / 16 bias vectors loaded once for all rows instead of once per row and gate. The time
// loop calls this for every 32-row tile of every panel of every step.
template <int64_t kUnits>
inline void lstm_cell_panel_f32(const CellFwdParams& p, int64_t m0, int64_t m, int64_t j0) {
  using V = Vec<float>;
  constexpr int64_t W = V::size(), kVecs = kUnits / W;
  static_assert(kUnits % W == 0, "whole vectors per panel");
  const int64_t H = p.hidden, gb = p.gate_block;
  const float* bias = static_cast<const float*>(p.b_ih);
  V b[4][kVecs];
  for (int k = 0; k < 4; ++k)
    for (int v = 0; v < kVecs; ++v) b[k][v] = bias ? V::loadu(bias + k * H + j0 + v * W) : V(0.f);
  const int64_t shift = (j0 / gb) * 3 * gb;
  for (int64_t row = m0; row < m0 + m; ++row) {
    const float* ig = Row<float>::at(p.igates, p.igates_stride, row) + shift + j0;
    const float* hg = Row<float>::at(p.hgates, p.hgates_stride, row) + shift + j0;
    const float* cp = Row<float>::at(p.c_prev, p.c_prev_stride, row) + j0;
    float* cn_out = Row<float>::at(p.c_out, p.c_out_stride, row) + j0;
    float* h = Row<float>::at(p.h_out, p.h_out_stride, row) + j0;
    float* s = p.saved ? Row<float>::at(p.saved, p.saved_stride, row) + j0 : nullptr;
    for (int v = 0; v < kVecs; ++v) {
      const int64_t o = v * W;
      auto pre = [&](int k) {
        const V x = bias ? V::loadu(ig + k * gb + o) + b[k][v] : V::loadu(ig + k * gb + o);
        return x + V::loadu(hg + k * gb + o);
      };
      const V i = sigmoid(pre(0)), f = sigmoid(pre(1)), g = cpu::tanh(pre(2)), og = sigmoid(pre(3));
      const V cn = f * V::loadu(cp + o) + i * g;
      cn.store(cn_out + o);
      (og * cpu::tanh(cn)).store(h + o);
      if (s) {
        i.store(s + o);
        f.store(s + H + o);
        g.store(s + 2 * H + o);
        og.store(s + 3 * H + o);
      }
    }
  }
}

template <typename T>
void cell_forward(const CellFwdParams& p, bool parallel = true) {
  parallel_rows(
      p.batch, p.hidden, [&](int64_t b, int64_t j0, int64_t j1) { cell_forward_block<T>(p, b, j0, j1); }, parallel);
}

template <typename T>
void cell_backward(const CellBwdParams& p, bool parallel = true) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t H = p.hidden;
  const V one(T(1)), zero(T(0));
  parallel_rows(p.batch, H, [&](int64_t b, int64_t j0, int64_t j1) {
    const T* dh_row = Row<T>::at(p.grad_h, p.grad_h_stride, b);
    const T* s = Row<T>::at(p.saved, p.saved_stride, b);
    T* dgx = Row<T>::at(p.grad_igates, p.grad_igates_stride, b);
    for (int64_t j = j0; j < j1; j += W) {
      const int64_t n = std::min(W, j1 - j);
      const V dh = dh_row ? load(dh_row + j, n) : zero;
      if (p.mode == Mode::kLSTM) {
        const T* dc_row = Row<T>::at(p.grad_c, p.grad_c_stride, b);
        const V i = load(s + j, n), f = load(s + H + j, n), g = load(s + 2 * H + j, n), o = load(s + 3 * H + j, n);
        const V tc = cpu::tanh(load(Row<T>::at(p.c_out, p.c_out_stride, b) + j, n));
        const V cp = load(Row<T>::at(p.c_prev, p.c_prev_stride, b) + j, n);
        // d c_t = incoming d c + d h * o * tanh'(c_t)
        const V dc = (dc_row ? load(dc_row + j, n) : zero) + dh * o * (one - tc * tc);
        store((dc * g) * (i * (one - i)), dgx + j, n);
        store((dc * cp) * (f * (one - f)), dgx + H + j, n);
        store((dc * i) * (one - g * g), dgx + 2 * H + j, n);
        store((dh * tc) * (o * (one - o)), dgx + 3 * H + j, n);
        store(dc * f, Row<T>::at(p.grad_c_prev, p.grad_c_prev_stride, b) + j, n);
      } else if (p.mode == Mode::kGRU) {
        T* dgh = Row<T>::at(p.grad_hgates, p.grad_hgates_stride, b);
        const V r = load(s + j, n), z = load(s + H + j, n), nn = load(s + 2 * H + j, n), hn = load(s + 3 * H + j, n);
        const V hp = load(Row<T>::at(p.h_prev, p.h_prev_stride, b) + j, n);
        const V dn = (dh * (one - z)) * (one - nn * nn);  // through tanh
        const V dz = (dh * (hp - nn)) * (z * (one - z));
        const V dr = (dn * hn) * (r * (one - r));
        store(dr, dgx + j, n);
        store(dz, dgx + H + j, n);
        store(dn, dgx + 2 * H + j, n);
        store(dr, dgh + j, n);
        store(dz, dgh + H + j, n);
        store(dn * r, dgh + 2 * H + j, n);
        store(dh * z, Row<T>::at(p.grad_h_prev, p.grad_h_prev_stride, b) + j, n);
      } else {
        const V y = load(s + j, n);
        const V d = p.mode == Mode::kRNNTanh ? dh * (one - y * y) : V::blendv(zero, dh, y > zero);
        store(d, dgx + j, n);
      }
    }
  }, parallel);
}

}  // namespace fastdl::rnn::cpu
