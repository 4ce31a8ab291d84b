// CPU depthwise causal conv1d: forward, backward and the decoding update.
//
// Each (batch, channel) row is independent; at::parallel_for runs over rows. A row is copied once into a
// math-type buffer with width - 1 leading zeros (this also converts bf16 / fp16 and gathers strided or
// channel-last x), after which every output vector is `width` unaligned loads and FMAs:
//   out[t : t+16] = bias + sum_k w[k] * xpad[t + k : t + k + 16].
// The backward runs the transposed convolution on the padded gradient the same way, and sums dweight
// and dbias per row; rows of different batches are added in a fixed order afterwards, so the result
// does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "causal_conv1d/causal_conv1d_ops.h"
#include "common/cpu_utils.h"

namespace fastdl::causal_conv1d {
namespace {

using cpu::Vec;
using cpu::hsum;
using cpu::load_row;
using cpu::store_row;
using cpu::vload;
using cpu::vsigmoid;
using cpu::vstore;

// Loads weight row d and bias into math-type scalars.
template <typename T>
void load_weights(const ConvParams& p, int64_t d, T* w, T& bias) {
  load_row(p.weight, p.weight_dtype, d * p.weight_d_stride, p.weight_w_stride, p.width, w);
  bias = T(0);
  if (p.bias) load_row(p.bias, p.weight_dtype, d * p.bias_stride, 1, 1, &bias);
}

// pre[t] = bias + sum_k w[k] xpad[t + k], t < n; with silu, out = pre * sigmoid(pre).
template <typename T>
void conv_row(const T* xpad, const T* w, T bias, int64_t width, int64_t n, bool silu, T* pre, T* out) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  for (int64_t t = 0; t < n; t += W) {
    const int64_t cnt = std::min<int64_t>(W, n - t);
    V acc(bias);
    for (int64_t k = 0; k < width; ++k) acc = at::vec::fmadd(V(w[k]), vload(xpad + t + k, cnt), acc);
    if (pre) vstore(acc, pre + t, cnt);
    if (out) vstore(silu ? acc * vsigmoid(acc) : acc, out + t, cnt);
  }
}

template <typename T>
void fwd_impl(const ConvParams& p) {
  const int64_t L = p.seqlen, pad = p.width - 1;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L));  // rows per task
  at::parallel_for(0, p.batch * p.dim, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> xpad(L + pad), out(L);
    T w[kMaxWidth], bias;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.dim, d = i % p.dim;
      load_weights(p, d, w, bias);
      std::fill(xpad.begin(), xpad.begin() + pad, T(0));
      load_row(p.x, p.input_dtype, b * p.x_batch_stride + d * p.x_d_stride, p.x_l_stride, L, xpad.data() + pad);
      conv_row(xpad.data(), w, bias, p.width, L, p.silu, static_cast<T*>(nullptr), out.data());
      store_row(out.data(), L, p.out, p.input_dtype, i * L);
    }
  });
}

template <typename T>
void bwd_impl(const ConvBwdParams& p) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t L = p.seqlen, width = p.width, pad = width - 1, BD = p.batch * p.dim;
  std::vector<T> dw_part(BD * width), db_part(BD);  // per row, summed over the batch below
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L));  // rows per task
  at::parallel_for(0, BD, grain, [&](int64_t begin, int64_t end) {
    // gpad: the gradient wrt the pre-activation, with width - 1 trailing zeros.
    std::vector<T> xpad(L + pad), gpad(L + pad), dx(L);
    T w[kMaxWidth], bias;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.dim, d = i % p.dim;
      load_weights(p, d, w, bias);
      std::fill(xpad.begin(), xpad.begin() + pad, T(0));
      load_row(p.x, p.input_dtype, b * p.x_batch_stride + d * p.x_d_stride, p.x_l_stride, L, xpad.data() + pad);
      load_row(p.dout, p.input_dtype, b * p.dout_batch_stride + d * p.dout_d_stride, p.dout_l_stride, L, gpad.data());
      std::fill(gpad.begin() + L, gpad.end(), T(0));
      if (p.silu) {
        // silu'(s) = sigmoid(s) * (1 + s * (1 - sigmoid(s))), with s recomputed in place in dx.
        conv_row(xpad.data(), w, bias, width, L, false, dx.data(), static_cast<T*>(nullptr));
        for (int64_t t = 0; t < L; t += W) {
          const int64_t cnt = std::min<int64_t>(W, L - t);
          const V s = vload(dx.data() + t, cnt), sg = vsigmoid(s);
          vstore(vload(gpad.data() + t, cnt) * sg * at::vec::fmadd(s, V(T(1)) - sg, V(T(1))), gpad.data() + t, cnt);
        }
      }
      // dx[t] = sum_k w[k] g[t + pad - k];  dw[k] = sum_t g[t] xpad[t + k];  dbias = sum_t g[t].
      V dw[kMaxWidth], db(T(0));
      for (int64_t k = 0; k < width; ++k) dw[k] = V(T(0));
      for (int64_t t = 0; t < L; t += W) {
        const int64_t cnt = std::min<int64_t>(W, L - t);
        V acc(T(0));
        for (int64_t k = 0; k < width; ++k) acc = at::vec::fmadd(V(w[k]), vload(gpad.data() + t + pad - k, cnt), acc);
        vstore(acc, dx.data() + t, cnt);
        const V g = vload(gpad.data() + t, cnt);  // lanes past L load as 0
        db = db + g;
        for (int64_t k = 0; k < width; ++k) dw[k] = at::vec::fmadd(g, vload(xpad.data() + t + k, cnt), dw[k]);
      }
      store_row(dx.data(), L, p.dx, p.input_dtype, i * L);
      for (int64_t k = 0; k < width; ++k) dw_part[i * width + k] = hsum(dw[k]);
      db_part[i] = hsum(db);
    }
  });
  std::vector<T> dw(p.dim * width, T(0)), db(p.dim, T(0));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t j = 0; j < p.dim * width; ++j) dw[j] += dw_part[b * p.dim * width + j];
    for (int64_t d = 0; d < p.dim; ++d) db[d] += db_part[b * p.dim + d];
  }
  store_row(dw.data(), p.dim * width, p.dweight, p.weight_dtype, 0);
  store_row(db.data(), p.dim, p.dbias, p.weight_dtype, 0);
}

template <typename T>
void update_impl(const ConvUpdateParams& p) {
  const int64_t S = p.state_len, n = p.seqlen, pad = p.width - 1;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (S + n));
  at::parallel_for(0, p.batch * p.dim, grain, [&](int64_t begin, int64_t end) {
    // buf = [conv_state, x]: the output at t reads buf[S + t - pad .. S + t].
    std::vector<T> buf(S + n), out(n);
    T w[kMaxWidth], bias = T(0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.dim, d = i % p.dim;
      load_row(p.weight, p.weight_dtype, d * p.weight_d_stride, p.weight_w_stride, p.width, w);
      if (p.bias) load_row(p.bias, p.weight_dtype, d * p.bias_stride, 1, 1, &bias);
      const int64_t s_off = b * p.state_batch_stride + d * p.state_d_stride;
      load_row(p.conv_state, p.input_dtype, s_off, p.state_l_stride, S, buf.data());
      load_row(p.x, p.input_dtype, b * p.x_batch_stride + d * p.x_d_stride, p.x_l_stride, n, buf.data() + S);
      conv_row(buf.data() + S - pad, w, bias, p.width, n, p.silu, static_cast<T*>(nullptr), out.data());
      store_row(out.data(), n, p.out, p.input_dtype, i * n);
      store_row(buf.data() + n, S, p.conv_state, p.input_dtype, s_off, p.state_l_stride);
    }
  });
}

// Math type: fp64 for fp64 inputs, fp32 otherwise.
void fwd_cpu(const ConvParams& p) {
  if (p.input_dtype == DType::kFloat64) return fwd_impl<double>(p);
  fwd_impl<float>(p);
}
void bwd_cpu(const ConvBwdParams& p) {
  if (p.input_dtype == DType::kFloat64) return bwd_impl<double>(p);
  bwd_impl<float>(p);
}
void update_cpu(const ConvUpdateParams& p) {
  if (p.input_dtype == DType::kFloat64) return update_impl<double>(p);
  update_impl<float>(p);
}

}  // namespace
}  // namespace fastdl::causal_conv1d

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  FASTDL_REGISTER_CAUSAL_CONV1D_IMPLS(m, fastdl::causal_conv1d::fwd_cpu, fastdl::causal_conv1d::bwd_cpu,
                                      fastdl::causal_conv1d::update_cpu);
}
