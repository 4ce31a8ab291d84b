// CPU kernels of the fused layer ops: RMSNorm forward and backward, rotary embeddings, the SwiGLU gate.
//
// What they fuse: torch's composites make a full pass over the activations per elementwise op (pow,
// mean, rsqrt, mul, mul for RMSNorm; two muls, sub, add and cat per half for RoPE; silu then mul for
// SwiGLU), each re-reading and writing (rows, cols) from memory, and autograd saves the intermediates.
// Here every op reads its inputs once and writes its outputs once, row by row in L1: a row is at most a
// few KB, so the second sweep over it (normalize after the sum of squares) hits cache.
//
// Rows are independent and split by at::parallel_for. bf16 / fp16 rows are converted to an fp32 buffer
// first (at::vec::convert), fp32 / fp64 rows are read in place. The SIMD body is at::vec (16 floats on
// AVX-512), with masked loadu / store for the tails, so any size works.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "layers/layers_ops.h"

namespace fastdl::layers {
namespace {

using cpu::Vec;
using cpu::opmath_t;

// Dispatches on the storage dtype: fn(T{}) with T the C++ type.
template <typename Fn>
void dispatch_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kBFloat16: return fn(c10::BFloat16{});
    case DType::kFloat16: return fn(c10::Half{});
  }
}

// Rows of at least this many elements per parallel_for chunk, so that small inputs stay on one thread.
constexpr int64_t kGrainElements = 16384;

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// bf16 / fp16 -> fp32 with SIMD loads: at::vec::convert has an AVX-512 path for float -> bf16 but its
// bf16 -> float is the generic scalar loop, which made the bf16 kernels ~4x slower than the fp32 ones.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  constexpr int64_t V = Vec<T>::size(), F = Vec<float>::size();  // V = 2 F
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const auto [lo, hi] = at::vec::convert_to_float<T>(Vec<T>::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + F);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The row in the math type: src itself when T is M, else converted into buf.
template <typename T, typename M>
inline const M* row_in(const T* src, int64_t n, M* buf) {
  if constexpr (std::is_same_v<T, M>) {
    return src;
  } else {
    to_float(src, buf, n);
    return buf;
  }
}

// Where to compute an output row: dst itself when T is M, else buf (then row_out converts it).
template <typename T, typename M>
inline M* row_target(T* dst, M* buf) {
  if constexpr (std::is_same_v<T, M>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T, typename M>
inline void row_out(const M* buf, int64_t n, T* dst) {
  if constexpr (!std::is_same_v<T, M>) at::vec::convert(buf, dst, n);
}

template <typename M>
inline M sum_lanes(const Vec<M>& v) {
  return at::vec::vec_reduce_all<M>([](Vec<M>& a, Vec<M>& b) { return a + b; }, v);
}

// sum_i a[i] * b[i], with two accumulators to hide the FMA latency.
template <typename M>
inline M dot(const M* a, const M* b, int64_t n) {
  constexpr int64_t V = Vec<M>::size();
  Vec<M> acc0(M(0)), acc1(M(0));
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    acc0 = at::vec::fmadd(Vec<M>::loadu(a + i), Vec<M>::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec<M>::loadu(a + i + V), Vec<M>::loadu(b + i + V), acc1);
  }
  for (; i < n; i += V) {
    const int64_t m = std::min(V, n - i);
    acc0 = at::vec::fmadd(Vec<M>::loadu(a + i, m), Vec<M>::loadu(b + i, m), acc0);
  }
  return sum_lanes<M>(acc0 + acc1);
}

// ---- rms_norm ---------------------------------------------------------------------------------------

template <typename T>
void rms_norm_fwd_typed(const RMSNormParams& p) {
  using M = opmath_t<T>;
  constexpr int64_t V = Vec<M>::size();
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  M* rstd = static_cast<M*>(p.rstd);
  const M inv_cols = M(1) / static_cast<M>(cols), eps = static_cast<M>(p.eps);
  at::parallel_for(0, p.rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<M> xbuf(std::is_same_v<T, M> ? 0 : cols), obuf(std::is_same_v<T, M> ? 0 : cols), wbuf;
    const M* w = nullptr;
    if (p.weight) {
      wbuf.resize(std::is_same_v<T, M> ? 0 : cols);
      w = row_in(static_cast<const T*>(p.weight), cols, wbuf.data());
    }
    for (int64_t r = begin; r < end; ++r) {
      const M* xr = row_in(x + r * p.x_row_stride, cols, xbuf.data());
      const M rs = M(1) / std::sqrt(dot(xr, xr, cols) * inv_cols + eps);
      rstd[r] = rs;
      M* o = row_target(out + r * cols, obuf.data());
      const Vec<M> vrs(rs);
      for (int64_t i = 0; i < cols; i += V) {
        const int64_t m = std::min(V, cols - i);
        Vec<M> y = Vec<M>::loadu(xr + i, m) * vrs;
        if (w) y = y * Vec<M>::loadu(w + i, m);
        y.store(o + i, m);
      }
      row_out(o, cols, out + r * cols);
    }
  });
}

// dx = rstd * (g w) - x * rstd^3 * <g w, x> / cols;  dweight = sum_rows g * x * rstd.
template <typename T>
void rms_norm_bwd_typed(const RMSNormBwdParams& p) {
  using M = opmath_t<T>;
  constexpr int64_t V = Vec<M>::size();
  const int64_t cols = p.cols, rows = p.rows;
  const T* x = static_cast<const T*>(p.x);
  const T* dout = static_cast<const T*>(p.dout);
  const M* rstd = static_cast<const M*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  M* partial = static_cast<M*>(p.dweight_partial);
  const M inv_cols = M(1) / static_cast<M>(cols);
  // With a weight the rows go in fixed blocks (one dweight partial each); without, in any chunks.
  const int64_t blocks = p.weight ? rms_norm_row_blocks(rows) : rows;
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  const int64_t grain = p.weight ? 1 : row_grain(cols);
  at::parallel_for(0, blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    const int64_t scratch = std::is_same_v<T, M> ? 0 : cols;
    std::vector<M> xbuf(scratch), gbuf(scratch), obuf(scratch), wbuf, gw(cols);
    const M* w = nullptr;
    if (p.weight) {
      wbuf.resize(scratch);
      w = row_in(static_cast<const T*>(p.weight), cols, wbuf.data());
    }
    for (int64_t block = block_begin; block < block_end; ++block) {
      M* dw = partial ? partial + block * cols : nullptr;
      if (dw) std::fill(dw, dw + cols, M(0));
      const int64_t r_end = p.weight ? std::min(rows, (block + 1) * rows_per_block) : block + 1;
      for (int64_t r = p.weight ? block * rows_per_block : block; r < r_end; ++r) {
        const M* xr = row_in(x + r * p.x_row_stride, cols, xbuf.data());
        const M* gr = row_in(dout + r * p.dout_row_stride, cols, gbuf.data());
        const M rs = rstd[r];
        const Vec<M> vrs(rs);
        const M* g = gr;
        if (w) {
          // gw = g * w, and dweight += g * (x * rstd) in the same sweep.
          for (int64_t i = 0; i < cols; i += V) {
            const int64_t m = std::min(V, cols - i);
            const Vec<M> gv = Vec<M>::loadu(gr + i, m);
            (gv * Vec<M>::loadu(w + i, m)).store(gw.data() + i, m);
            at::vec::fmadd(gv, Vec<M>::loadu(xr + i, m) * vrs, Vec<M>::loadu(dw + i, m)).store(dw + i, m);
          }
          g = gw.data();
        }
        const Vec<M> vb(rs * rs * rs * dot(g, xr, cols) * inv_cols);
        M* o = row_target(dx + r * cols, obuf.data());
        for (int64_t i = 0; i < cols; i += V) {
          const int64_t m = std::min(V, cols - i);
          (Vec<M>::loadu(g + i, m) * vrs - Vec<M>::loadu(xr + i, m) * vb).store(o + i, m);
        }
        row_out(o, cols, dx + r * cols);
      }
    }
  });
  if (!p.weight) return;
  // dweight = the block partials summed in block order, columns in parallel.
  T* dweight = static_cast<T*>(p.dweight);
  at::parallel_for(0, cols, std::max<int64_t>(V, kGrainElements / std::max<int64_t>(blocks, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<M> acc(end - begin, M(0));
    for (int64_t b = 0; b < blocks; ++b) {
      const M* src = partial + b * cols + begin;
      for (int64_t i = 0; i < end - begin; i += V) {
        const int64_t m = std::min(V, end - begin - i);
        (Vec<M>::loadu(acc.data() + i, m) + Vec<M>::loadu(src + i, m)).store(acc.data() + i, m);
      }
    }
    if constexpr (std::is_same_v<T, M>) {
      std::copy(acc.begin(), acc.end(), dweight + begin);
    } else {
      at::vec::convert(acc.data(), dweight + begin, end - begin);
    }
  });
}

void rms_norm_fwd_cpu(const RMSNormParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { rms_norm_fwd_typed<decltype(t)>(p); });
}

void rms_norm_bwd_cpu(const RMSNormBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { rms_norm_bwd_typed<decltype(t)>(p); });
}

// ---- rotary_emb -------------------------------------------------------------------------------------

template <typename T>
void rotary_emb_typed(const RotaryParams& p) {
  using M = opmath_t<T>;
  constexpr int64_t V = Vec<M>::size();
  const int64_t half = p.headdim / 2, H = p.nheads, D = p.headdim;
  const T* x = static_cast<const T*>(p.x);
  const M* cos = static_cast<const M*>(p.cos);
  const M* sin = static_cast<const M*>(p.sin);
  T* out = static_cast<T*>(p.out);
  // Rotating by -angle is rotating by angle with sin negated.
  const Vec<M> sign(p.conjugate ? M(-1) : M(1));
  at::parallel_for(0, p.batch * p.seqlen, row_grain(H * D), [&](int64_t begin, int64_t end) {
    std::vector<M> xbuf(std::is_same_v<T, M> ? 0 : D), obuf(std::is_same_v<T, M> ? 0 : D);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / p.seqlen, t = bt % p.seqlen;
      const M* c = cos + b * p.cos_batch_stride + t * p.cos_seq_stride;  // (headdim / 2,): shared by the heads
      const M* s = sin + b * p.sin_batch_stride + t * p.sin_seq_stride;
      const T* xbt = x + b * p.x_batch_stride + t * p.x_seq_stride;
      T* obt = out + bt * H * D;
      for (int64_t h = 0; h < H; ++h) {
        const M* xr = row_in(xbt + h * p.x_head_stride, D, xbuf.data());
        M* o = row_target(obt + h * D, obuf.data());
        for (int64_t i = 0; i < half; i += V) {
          const int64_t m = std::min(V, half - i);
          const Vec<M> x1 = Vec<M>::loadu(xr + i, m), x2 = Vec<M>::loadu(xr + half + i, m);
          const Vec<M> cv = Vec<M>::loadu(c + i, m), sv = Vec<M>::loadu(s + i, m) * sign;
          (x1 * cv - x2 * sv).store(o + i, m);
          (x2 * cv + x1 * sv).store(o + half + i, m);
        }
        row_out(o, D, obt + h * D);
      }
    }
  });
}

void rotary_emb_cpu(const RotaryParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { rotary_emb_typed<decltype(t)>(p); });
}

// ---- swiglu -----------------------------------------------------------------------------------------

// sigmoid(g) = 1 / (1 + exp(-g)). exp_u20 (a degree-5 polynomial, at most 20 ulp; torch's own fast exp)
// instead of Sleef's 1-ulp exp: the exp bounded fp32 SwiGLU at 31 GB/s. Its input is clamped to
// [-87.3, 88.7], so sigmoid(g) for g < -88.7 is 1 / (1 + 3.4e38), a denormal instead of 0, and
// silu(g) = g * sigmoid(g) is still 0 to within 1e-34. fp64 uses Sleef's exp either way.
template <typename M>
inline Vec<M> vsigmoid(const Vec<M>& g) {
  return Vec<M>(M(1)) / (Vec<M>(M(1)) + g.neg().exp_u20());
}

template <typename T>
void swiglu_fwd_typed(const SwiGLUParams& p) {
  using M = opmath_t<T>;
  constexpr int64_t V = Vec<M>::size();
  const int64_t cols = p.cols;
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    const int64_t scratch = std::is_same_v<T, M> ? 0 : cols;
    std::vector<M> gbuf(scratch), ubuf(scratch), obuf(scratch);
    for (int64_t r = begin; r < end; ++r) {
      const M* g = row_in(gate + r * p.gate_row_stride, cols, gbuf.data());
      const M* u = row_in(up + r * p.up_row_stride, cols, ubuf.data());
      M* o = row_target(out + r * cols, obuf.data());
      for (int64_t i = 0; i < cols; i += V) {
        const int64_t m = std::min(V, cols - i);
        const Vec<M> gv = Vec<M>::loadu(g + i, m);
        (gv * vsigmoid(gv) * Vec<M>::loadu(u + i, m)).store(o + i, m);
      }
      row_out(o, cols, out + r * cols);
    }
  });
}

// dup = dout * silu(g);  dgate = dout * up * s * (1 + g * (1 - s)),  s = sigmoid(g).
template <typename T>
void swiglu_bwd_typed(const SwiGLUBwdParams& p) {
  using M = opmath_t<T>;
  constexpr int64_t V = Vec<M>::size();
  const int64_t cols = p.cols;
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  const T* dout = static_cast<const T*>(p.dout);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  at::parallel_for(0, p.rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    const int64_t scratch = std::is_same_v<T, M> ? 0 : cols;
    std::vector<M> gbuf(scratch), ubuf(scratch), dbuf(scratch), dgbuf(scratch), dubuf(scratch);
    const Vec<M> one(M(1));
    for (int64_t r = begin; r < end; ++r) {
      const M* g = row_in(gate + r * p.gate_row_stride, cols, gbuf.data());
      const M* u = row_in(up + r * p.up_row_stride, cols, ubuf.data());
      const M* d = row_in(dout + r * p.dout_row_stride, cols, dbuf.data());
      M* dg = row_target(dgate + r * cols, dgbuf.data());
      M* du = row_target(dup + r * cols, dubuf.data());
      for (int64_t i = 0; i < cols; i += V) {
        const int64_t m = std::min(V, cols - i);
        const Vec<M> gv = Vec<M>::loadu(g + i, m), dv = Vec<M>::loadu(d + i, m);
        const Vec<M> s = vsigmoid(gv);
        (dv * gv * s).store(du + i, m);
        (dv * Vec<M>::loadu(u + i, m) * s * (one + gv * (one - s))).store(dg + i, m);
      }
      row_out(dg, cols, dgate + r * cols);
      row_out(du, cols, dup + r * cols);
    }
  });
}

void swiglu_fwd_cpu(const SwiGLUParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { swiglu_fwd_typed<decltype(t)>(p); });
}

void swiglu_bwd_cpu(const SwiGLUBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { swiglu_bwd_typed<decltype(t)>(p); });
}

}  // namespace
}  // namespace fastdl::layers

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  FASTDL_REGISTER_LAYER_IMPLS(m, fastdl::layers::rms_norm_fwd_cpu, fastdl::layers::rms_norm_bwd_cpu,
                              fastdl::layers::rotary_emb_cpu, fastdl::layers::swiglu_fwd_cpu,
                              fastdl::layers::swiglu_bwd_cpu);
}
