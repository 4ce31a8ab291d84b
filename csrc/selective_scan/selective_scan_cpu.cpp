// CPU selective scan (Mamba's S6 recurrence): forward, backward, and the one-step decoding update.
//
// Work is split into units of (batch, group of B/C, block of up to kBlock channels); at::parallel_for
// runs over units. Within a unit, time advances in chunks of kChunk = 64 steps:
//   - the chunk of input-dependent B and C (dstate x 64) is transposed once into L1 tiles with B_t
//     contiguous, and then read by every channel of the block;
//   - each channel runs the 64 steps with its state h in SIMD registers (dstate lanes, padded to whole
//     vectors with A = B = C = 0, which keeps the padded lanes at exactly 0);
//   - y_t = <C_t, h_t> needs a horizontal sum per step: the per-step product vectors go to a 64 x 16
//     tile, and one transpose turns 16 horizontal sums into 16 vertical adds.
// The forward stores h at the start of every chunk (the checkpoints). The backward walks the chunks in
// reverse: it recomputes the chunk's states from its checkpoint into an L1 buffer, then runs the adjoint
// recurrence g_{t-1} = exp(delta_t A) * g_t backwards through it. Memory stays O(batch*dim*(L + dstate)).
//
// Gradients of B / C (input dependent: summed over the channels of a group; per channel: summed over
// the batch), A, D and delta_bias are reductions. Each unit writes its own partial sums, and a second
// pass adds the partials in a fixed order: the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_utils.h"
#include "selective_scan/selective_scan_ops.h"

namespace fastdl::selective_scan {
namespace {

using cpu::Vec;

constexpr int64_t kChunk = kCheckpointChunk;
// Channels per work unit. B/C tiles are transposed once per unit and chunk, so a larger block
// amortises them better; 32 channels still gives 96 units for batch 2 x dim 1536 to balance.
constexpr int64_t kBlock = 32;

// ---- rows in any storage dtype <-> math-type arrays ----

template <typename S, typename T>
void load_row_as(const S* src, int64_t stride, int64_t n, T* dst) {
  if (stride == 1) {
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(dst, src, n * sizeof(T));
    } else {
      at::vec::convert(src, dst, n);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i * stride]);
  }
}

// dst[i] = base[offset + i * stride], i < n, converted to T.
template <typename T>
void load_row(const void* base, DType dt, int64_t offset, int64_t stride, int64_t n, T* dst) {
  switch (dt) {
    case DType::kFloat32: return load_row_as(static_cast<const float*>(base) + offset, stride, n, dst);
    case DType::kFloat64: return load_row_as(static_cast<const double*>(base) + offset, stride, n, dst);
    case DType::kBFloat16: return load_row_as(static_cast<const c10::BFloat16*>(base) + offset, stride, n, dst);
    case DType::kFloat16: return load_row_as(static_cast<const c10::Half*>(base) + offset, stride, n, dst);
  }
}

template <typename T, typename S>
void store_row_as(const T* src, int64_t n, S* dst) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// base[offset + i] = src[i], i < n (outputs are contiguous).
template <typename T>
void store_row(const T* src, int64_t n, void* base, DType dt, int64_t offset) {
  switch (dt) {
    case DType::kFloat32: return store_row_as(src, n, static_cast<float*>(base) + offset);
    case DType::kFloat64: return store_row_as(src, n, static_cast<double*>(base) + offset);
    case DType::kBFloat16: return store_row_as(src, n, static_cast<c10::BFloat16*>(base) + offset);
    case DType::kFloat16: return store_row_as(src, n, static_cast<c10::Half*>(base) + offset);
  }
}

// ---- vector helpers ----

// Sum of the lanes of v.
template <typename T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T buf[Vec<T>::size()];
  v.store(buf);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += buf[i];
  return s;
}

template <typename T>
inline Vec<T> vload(const T* p, int64_t cnt) {
  return cnt == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, cnt);
}
template <typename T>
inline void vstore(const Vec<T>& v, T* p, int64_t cnt) {
  if (cnt == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, cnt);
  }
}
// f(i, cnt) over [0, n) in steps of one vector.
template <typename T, typename F>
inline void vec_loop(int64_t n, F&& f) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t i = 0; i < n; i += W) f(i, std::min<int64_t>(W, n - i));
}

// exp of delta * A, the innermost cost. fp32: at::vec's exp_u20 (20 ulp, about 1e-6 relative; the
// state decays, so the error does not grow with L). fp64: the full-precision exp, for gradcheck.
inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  return Vec<T>(T(1)) / (Vec<T>(T(1)) + x.neg().exp());
}

// torch.nn.functional.softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)).
template <typename T>
inline Vec<T> vsoftplus(const Vec<T>& x) {
  const Vec<T> thr(T(20));
  return Vec<T>::blendv(at::vec::minimum(x, thr).exp().log1p(), x, x > thr);
}
// Its derivative, as torch's softplus_backward: x > 20 ? 1 : sigmoid(x).
template <typename T>
inline Vec<T> vsoftplus_grad(const Vec<T>& x) {
  const Vec<T> thr(T(20));
  return Vec<T>::blendv(vsigmoid(at::vec::minimum(x, thr)), Vec<T>(T(1)), x > thr);
}

// out[t] = sum of the W lanes of row t of P ([len][W]). fp32: 16 rows at a time, one 16 x 16 transpose
// and 15 vertical adds instead of 16 horizontal reductions.
inline void row_sums(const float* P, int64_t len, float* out) {
  constexpr int64_t W = Vec<float>::size();
  alignas(64) float tmp[W * W] = {};
  for (int64_t t0 = 0; t0 < len; t0 += W) {
    const int m = static_cast<int>(std::min<int64_t>(W, len - t0));
    at::vec::transpose_mxn<float>(P + t0 * W, W, tmp, W, m, W);
    Vec<float> s = Vec<float>::loadu(tmp);
    for (int64_t j = 1; j < W; ++j) s = s + Vec<float>::loadu(tmp + j * W);
    vstore(s, out + t0, m);
  }
}
inline void row_sums(const double* P, int64_t len, double* out) {
  constexpr int64_t W = Vec<double>::size();
  for (int64_t t = 0; t < len; ++t) {
    double s = 0;
    for (int64_t j = 0; j < W; ++j) s += P[t * W + j];
    out[t] = s;
  }
}

template <typename T>
inline void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t m, int64_t n) {
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, static_cast<int>(m), static_cast<int>(n));
}

// Loads an input-dependent B or C chunk, (dstate, len) in storage at `offset` with strides (sn, sl),
// as tile[t][i] (row stride npad). Padded columns i >= dstate are left as they are (zero).
template <typename T>
void load_bc_tile(const void* base, DType dt, int64_t offset, int64_t sn, int64_t sl, int64_t n, int64_t len,
                  int64_t npad, T* staging, T* tile) {
  if (sl == 1 && dt == (std::is_same_v<T, double> ? DType::kFloat64 : DType::kFloat32)) {
    transpose(static_cast<const T*>(base) + offset, sn, tile, npad, n, len);
    return;
  }
  for (int64_t i = 0; i < n; ++i) load_row(base, dt, offset + i * sn, sl, len, staging + i * kChunk);
  transpose(staging, kChunk, tile, npad, n, len);
}

// ---- work decomposition ----

struct Units {
  int64_t groups, channels_per_group, blocks_per_group, count, grain;
  explicit Units(const ScanParams& p) {
    groups = (p.is_variable_B || p.is_variable_C) ? p.n_groups : 1;
    channels_per_group = p.dim / groups;
    blocks_per_group = (channels_per_group + kBlock - 1) / kBlock;
    count = p.batch * groups * blocks_per_group;
    // Units per task: at least ~256K state updates (~0.1 ms), so that small scans do not pay for
    // waking the thread pool (torch's own GRAIN_SIZE is 32K elements of an elementwise op).
    const int64_t unit_work = std::max<int64_t>(1, std::min(kBlock, channels_per_group) * p.seqlen * p.dstate);
    grain = std::max<int64_t>(1, (int64_t{1} << 18) / unit_work);
  }
  // Unit i -> batch b, group g, channels [d0, d1).
  void decode(int64_t i, int64_t& b, int64_t& g, int64_t& j, int64_t& d0, int64_t& d1) const {
    j = i % blocks_per_group;
    g = (i / blocks_per_group) % groups;
    b = i / (blocks_per_group * groups);
    d0 = g * channels_per_group + j * kBlock;
    d1 = std::min(d0 + kBlock, (g + 1) * channels_per_group);
  }
};

template <typename T>
constexpr int kMaxVecs = static_cast<int>((kMaxDstate + Vec<T>::size() - 1) / Vec<T>::size());

// Per-channel parameters of a block, padded with zeros to npad lanes.
template <typename T>
void load_block_params(const ScanParams& p, int64_t d0, int64_t nd, int64_t npad, T* Apad, T* Bw, T* Cw) {
  const int64_t n = p.dstate;
  std::fill(Apad, Apad + nd * npad, T(0));
  for (int64_t ch = 0; ch < nd; ++ch) {
    const int64_t d = d0 + ch;
    load_row(p.A, p.weight_dtype, d * p.A_d_stride, p.A_n_stride, n, Apad + ch * npad);
    if (!p.is_variable_B) {
      std::fill(Bw + ch * npad, Bw + (ch + 1) * npad, T(0));
      load_row(p.B, p.weight_dtype, d * p.B_d_stride, p.B_n_stride, n, Bw + ch * npad);
    }
    if (!p.is_variable_C) {
      std::fill(Cw + ch * npad, Cw + (ch + 1) * npad, T(0));
      load_row(p.C, p.weight_dtype, d * p.C_d_stride, p.C_n_stride, n, Cw + ch * npad);
    }
  }
}

// Per-channel chunk inputs: delta after bias and softplus (and its pre-softplus value for the backward),
// delta * u.
template <typename T>
void load_delta_chunk(const ScanParams& p, int64_t b, int64_t d, int64_t t0, int64_t len, T* u, T* dl_raw, T* dl,
                      T* dlu) {
  load_row(p.u, p.input_dtype, b * p.u_batch_stride + d * p.u_d_stride + t0 * p.u_l_stride, p.u_l_stride, len, u);
  load_row(p.delta, p.input_dtype, b * p.delta_batch_stride + d * p.delta_d_stride + t0 * p.delta_l_stride,
           p.delta_l_stride, len, dl_raw);
  T bias = T(0);
  if (p.delta_bias) load_row(p.delta_bias, p.weight_dtype, d * p.delta_bias_stride, 1, 1, &bias);
  vec_loop<T>(len, [&](int64_t i, int64_t cnt) {
    Vec<T> x = vload(dl_raw + i, cnt) + Vec<T>(bias);
    vstore(x, dl_raw + i, cnt);
    if (p.delta_softplus) x = vsoftplus(x);
    vstore(x, dl + i, cnt);
    vstore(x * vload(u + i, cnt), dlu + i, cnt);
  });
}

// ---- forward ----

template <typename T>
struct FwdWorkspace {
  std::vector<T> Bt, Ct, staging, Apad, Bw, Cw, h;
  alignas(64) T u[kChunk], dl_raw[kChunk], dl[kChunk], dlu[kChunk], z[kChunk], y[kChunk];
  alignas(64) T P[kChunk * Vec<T>::size()];
  FwdWorkspace(int64_t npad, int64_t dstate)
      : Bt(kChunk * npad, T(0)), Ct(kChunk * npad, T(0)), staging(dstate * kChunk), Apad(kBlock * npad),
        Bw(kBlock * npad), Cw(kBlock * npad), h(kBlock * npad) {}
};

template <typename T, int NV>
void scan_fwd_unit(const ScanParams& p, const Units& units, int64_t unit, FwdWorkspace<T>& ws) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int nv = NV ? NV : static_cast<int>((p.dstate + W - 1) / W);
  const int64_t n = p.dstate, npad = nv * W, L = p.seqlen;
  int64_t b, g, j, d0, d1;
  units.decode(unit, b, g, j, d0, d1);
  const int64_t nd = d1 - d0;
  T* ckpt = static_cast<T*>(p.checkpoints);

  load_block_params(p, d0, nd, npad, ws.Apad.data(), ws.Bw.data(), ws.Cw.data());
  std::fill(ws.h.begin(), ws.h.end(), T(0));
  if (p.initial_state)
    for (int64_t ch = 0; ch < nd; ++ch)
      load_row(p.initial_state, p.weight_dtype,
               b * p.x0_batch_stride + (d0 + ch) * p.x0_d_stride, p.x0_n_stride, n, ws.h.data() + ch * npad);

  for (int64_t c = 0; c < p.n_chunks; ++c) {
    const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
    if (p.is_variable_B)
      load_bc_tile(p.B, p.input_dtype, b * p.B_batch_stride + g * p.B_group_stride + t0 * p.B_l_stride,
                   p.B_n_stride, p.B_l_stride, n, len, npad, ws.staging.data(), ws.Bt.data());
    if (p.is_variable_C)
      load_bc_tile(p.C, p.input_dtype, b * p.C_batch_stride + g * p.C_group_stride + t0 * p.C_l_stride,
                   p.C_n_stride, p.C_l_stride, n, len, npad, ws.staging.data(), ws.Ct.data());

    for (int64_t ch = 0; ch < nd; ++ch) {
      const int64_t d = d0 + ch;
      T* hc = ws.h.data() + ch * npad;
      std::copy(hc, hc + n, ckpt + ((b * p.dim + d) * p.n_chunks + c) * n);
      load_delta_chunk(p, b, d, t0, len, ws.u, ws.dl_raw, ws.dl, ws.dlu);

      V h[NV ? NV : kMaxVecs<T>], A[NV ? NV : kMaxVecs<T>];
      for (int k = 0; k < nv; ++k) {
        h[k] = V::loadu(hc + k * W);
        A[k] = V::loadu(ws.Apad.data() + ch * npad + k * W);
      }
      // Per-channel B / C: the same row every step (step 0).
      const T* Bp = p.is_variable_B ? ws.Bt.data() : ws.Bw.data() + ch * npad;
      const T* Cp = p.is_variable_C ? ws.Ct.data() : ws.Cw.data() + ch * npad;
      const int64_t bstep = p.is_variable_B ? npad : 0, cstep = p.is_variable_C ? npad : 0;
      for (int64_t t = 0; t < len; ++t) {
        const V dt(ws.dl[t]), dtu(ws.dlu[t]);
        const T* Bt = Bp + t * bstep;
        const T* Ct = Cp + t * cstep;
        V acc(T(0));
        for (int k = 0; k < nv; ++k) {
          const V a = vexp(dt * A[k]);
          h[k] = at::vec::fmadd(a, h[k], V::loadu(Bt + k * W) * dtu);
          acc = at::vec::fmadd(h[k], V::loadu(Ct + k * W), acc);
        }
        acc.store(ws.P + t * W);
      }
      for (int k = 0; k < nv; ++k) h[k].store(hc + k * W);

      row_sums(ws.P, len, ws.y);
      T Dd = T(0);
      if (p.D) load_row(p.D, p.weight_dtype, d * p.D_stride, 1, 1, &Dd);
      if (p.z) load_row(p.z, p.input_dtype, b * p.z_batch_stride + d * p.z_d_stride + t0 * p.z_l_stride, p.z_l_stride, len, ws.z);
      vec_loop<T>(len, [&](int64_t i, int64_t cnt) {
        V y = at::vec::fmadd(V(Dd), vload(ws.u + i, cnt), vload(ws.y + i, cnt));
        if (p.z) {
          const V zv = vload(ws.z + i, cnt);
          y = y * zv * vsigmoid(zv);
        }
        vstore(y, ws.y + i, cnt);
      });
      store_row(ws.y, len, p.out, p.input_dtype, (b * p.dim + d) * L + t0);
    }
  }
  T* last = static_cast<T*>(p.last_state);
  for (int64_t ch = 0; ch < nd; ++ch)
    std::copy(ws.h.data() + ch * npad, ws.h.data() + ch * npad + n, last + (b * p.dim + d0 + ch) * n);
}

template <typename T, int NV>
void scan_fwd_impl(const ScanParams& p) {
  const Units units(p);
  const int64_t npad = (p.dstate + Vec<T>::size() - 1) / Vec<T>::size() * Vec<T>::size();
  at::parallel_for(0, units.count, units.grain, [&](int64_t begin, int64_t end) {
    FwdWorkspace<T> ws(npad, p.dstate);
    for (int64_t i = begin; i < end; ++i) scan_fwd_unit<T, NV>(p, units, i, ws);
  });
}

// ---- backward ----

template <typename T>
struct BwdWorkspace {
  std::vector<T> Bt, Ct, dBt, dCt, staging, Apad, Bw, Cw, carry, dA, dBw, dCw, H, expA;
  std::vector<T> dD, dbias;
  alignas(64) T h0[kMaxDstate + 64];
  alignas(64) T u[kChunk], dl_raw[kChunk], dl[kChunk], dlu[kChunk], z[kChunk], y[kChunk], dout[kChunk];
  alignas(64) T dy[kChunk], s1[kChunk], s2[kChunk];
  alignas(64) T P[kChunk * Vec<T>::size()], P1[kChunk * Vec<T>::size()], P2[kChunk * Vec<T>::size()];
  BwdWorkspace(int64_t npad, int64_t dstate)
      : Bt(kChunk * npad, T(0)), Ct(kChunk * npad, T(0)), dBt(kChunk * npad), dCt(kChunk * npad),
        staging(dstate * kChunk), Apad(kBlock * npad), Bw(kBlock * npad), Cw(kBlock * npad), carry(kBlock * npad),
        dA(kBlock * npad), dBw(kBlock * npad), dCw(kBlock * npad), H(kChunk * npad), expA(kChunk * npad),
        dD(kBlock), dbias(kBlock) {}
};

// Partial sums written by each unit, reduced in a fixed order after the parallel pass.
template <typename T>
struct BwdPartials {
  std::vector<T> dA, dBw, dCw;  // [batch][dim][dstate]: per-channel sums over one sequence
  std::vector<T> dD, dbias;     // [batch][dim]
  std::vector<T> dB, dC;        // [batch][groups][blocks_per_group][dstate][L]: input-dependent B / C
};

template <typename T, int NV>
void scan_bwd_unit(const ScanBwdParams& p, const Units& units, int64_t unit, BwdWorkspace<T>& ws,
                   BwdPartials<T>& part) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int nv = NV ? NV : static_cast<int>((p.dstate + W - 1) / W);
  const int64_t n = p.dstate, npad = nv * W, L = p.seqlen;
  int64_t b, g, j, d0, d1;
  units.decode(unit, b, g, j, d0, d1);
  const int64_t nd = d1 - d0;
  const T* ckpt = static_cast<const T*>(p.checkpoints);

  load_block_params(p, d0, nd, npad, ws.Apad.data(), ws.Bw.data(), ws.Cw.data());
  for (auto* v : {&ws.carry, &ws.dA, &ws.dBw, &ws.dCw}) std::fill(v->begin(), v->end(), T(0));
  std::fill(ws.dD.begin(), ws.dD.end(), T(0));
  std::fill(ws.dbias.begin(), ws.dbias.end(), T(0));
  std::fill(ws.h0, ws.h0 + npad, T(0));
  if (p.dlast_state)
    for (int64_t ch = 0; ch < nd; ++ch)
      load_row(p.dlast_state, p.weight_dtype, b * p.dlast_batch_stride + (d0 + ch) * p.dlast_d_stride,
               p.dlast_n_stride, n, ws.carry.data() + ch * npad);
  const int64_t unit_slot = (b * units.groups + g) * units.blocks_per_group + j;

  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
    if (p.is_variable_B) {
      load_bc_tile(p.B, p.input_dtype, b * p.B_batch_stride + g * p.B_group_stride + t0 * p.B_l_stride,
                   p.B_n_stride, p.B_l_stride, n, len, npad, ws.staging.data(), ws.Bt.data());
      std::fill(ws.dBt.begin(), ws.dBt.begin() + len * npad, T(0));
    }
    if (p.is_variable_C) {
      load_bc_tile(p.C, p.input_dtype, b * p.C_batch_stride + g * p.C_group_stride + t0 * p.C_l_stride,
                   p.C_n_stride, p.C_l_stride, n, len, npad, ws.staging.data(), ws.Ct.data());
      std::fill(ws.dCt.begin(), ws.dCt.begin() + len * npad, T(0));
    }
    for (int64_t ch = 0; ch < nd; ++ch) {
      const int64_t d = d0 + ch;
      load_delta_chunk(p, b, d, t0, len, ws.u, ws.dl_raw, ws.dl, ws.dlu);
      load_row(p.dout, p.input_dtype, b * p.dout_batch_stride + d * p.dout_d_stride + t0 * p.dout_l_stride,
               p.dout_l_stride, len, ws.dout);
      std::copy(ckpt + ((b * p.dim + d) * p.n_chunks + c) * n, ckpt + ((b * p.dim + d) * p.n_chunks + c + 1) * n,
                ws.h0);
      const T* Bp = p.is_variable_B ? ws.Bt.data() : ws.Bw.data() + ch * npad;
      const T* Cp = p.is_variable_C ? ws.Ct.data() : ws.Cw.data() + ch * npad;
      const int64_t bstep = p.is_variable_B ? npad : 0, cstep = p.is_variable_C ? npad : 0;
      const T* Ach = ws.Apad.data() + ch * npad;
      V A[NV ? NV : kMaxVecs<T>];
      for (int k = 0; k < nv; ++k) A[k] = V::loadu(Ach + k * W);

      // Recompute the chunk's states from its checkpoint: H[t] = h_t, expA[t] = exp(delta_t A).
      {
        V h[NV ? NV : kMaxVecs<T>];
        for (int k = 0; k < nv; ++k) h[k] = V::loadu(ws.h0 + k * W);
        for (int64_t t = 0; t < len; ++t) {
          const V dt(ws.dl[t]), dtu(ws.dlu[t]);
          const T* Bt = Bp + t * bstep;
          const T* Ct = Cp + t * cstep;
          T* Ht = ws.H.data() + t * npad;
          T* Et = ws.expA.data() + t * npad;
          V acc(T(0));
          for (int k = 0; k < nv; ++k) {
            const V a = vexp(dt * A[k]);
            h[k] = at::vec::fmadd(a, h[k], V::loadu(Bt + k * W) * dtu);
            a.store(Et + k * W);
            h[k].store(Ht + k * W);
            if (p.z) acc = at::vec::fmadd(h[k], V::loadu(Ct + k * W), acc);
          }
          if (p.z) acc.store(ws.P + t * W);
        }
      }

      // Output gate: out = y * silu(z), so dy = dout * silu(z) and dz = dout * y * silu'(z).
      T Dd = T(0);
      if (p.D) load_row(p.D, p.weight_dtype, d * p.D_stride, 1, 1, &Dd);
      V dD_acc(T(0));
      if (p.z) {
        row_sums(ws.P, len, ws.y);
        load_row(p.z, p.input_dtype, b * p.z_batch_stride + d * p.z_d_stride + t0 * p.z_l_stride, p.z_l_stride, len,
                 ws.z);
        vec_loop<T>(len, [&](int64_t i, int64_t cnt) {
          const V zv = vload(ws.z + i, cnt), sg = vsigmoid(zv), dout = vload(ws.dout + i, cnt);
          const V y = at::vec::fmadd(V(Dd), vload(ws.u + i, cnt), vload(ws.y + i, cnt));
          const V dsilu = sg * at::vec::fmadd(zv, V(T(1)) - sg, V(T(1)));
          vstore(dout * zv * sg, ws.dy + i, cnt);
          vstore(dout * y * dsilu, ws.z + i, cnt);  // dz, in place of z
        });
        store_row(ws.z, len, p.dz, p.input_dtype, (b * p.dim + d) * L + t0);
      } else {
        std::copy(ws.dout, ws.dout + len, ws.dy);
      }

      // Reverse through the chunk. g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}.
      {
        V carry[NV ? NV : kMaxVecs<T>], dA[NV ? NV : kMaxVecs<T>];
        V dBc[NV ? NV : kMaxVecs<T>], dCc[NV ? NV : kMaxVecs<T>];
        T* carry_ch = ws.carry.data() + ch * npad;
        T* dA_ch = ws.dA.data() + ch * npad;
        T* dBw_ch = ws.dBw.data() + ch * npad;
        T* dCw_ch = ws.dCw.data() + ch * npad;
        for (int k = 0; k < nv; ++k) {
          carry[k] = V::loadu(carry_ch + k * W);
          dA[k] = V::loadu(dA_ch + k * W);
          dBc[k] = V::loadu(dBw_ch + k * W);
          dCc[k] = V::loadu(dCw_ch + k * W);
        }
        for (int64_t t = len - 1; t >= 0; --t) {
          const V dy(ws.dy[t]), dt(ws.dl[t]), dtu(ws.dlu[t]);
          const T* Bt = Bp + t * bstep;
          const T* Ct = Cp + t * cstep;
          const T* Ht = ws.H.data() + t * npad;
          const T* Hprev = t > 0 ? Ht - npad : ws.h0;
          const T* Et = ws.expA.data() + t * npad;
          T* dBt = ws.dBt.data() + t * npad;
          T* dCt = ws.dCt.data() + t * npad;
          V sB(T(0)), sA(T(0));
          for (int k = 0; k < nv; ++k) {
            const V gk = at::vec::fmadd(V::loadu(Ct + k * W), dy, carry[k]);
            const V ht = V::loadu(Ht + k * W);
            if (p.is_variable_C) {
              at::vec::fmadd(dy, ht, V::loadu(dCt + k * W)).store(dCt + k * W);
            } else {
              dCc[k] = at::vec::fmadd(dy, ht, dCc[k]);
            }
            if (p.is_variable_B) {
              at::vec::fmadd(gk, dtu, V::loadu(dBt + k * W)).store(dBt + k * W);
            } else {
              dBc[k] = at::vec::fmadd(gk, dtu, dBc[k]);
            }
            sB = at::vec::fmadd(gk, V::loadu(Bt + k * W), sB);
            const V ga = gk * V::loadu(Et + k * W);
            const V q = ga * V::loadu(Hprev + k * W);
            dA[k] = at::vec::fmadd(q, dt, dA[k]);
            sA = at::vec::fmadd(A[k], q, sA);
            carry[k] = ga;
          }
          sB.store(ws.P1 + t * W);
          sA.store(ws.P2 + t * W);
        }
        for (int k = 0; k < nv; ++k) {
          carry[k].store(carry_ch + k * W);
          dA[k].store(dA_ch + k * W);
          dBc[k].store(dBw_ch + k * W);
          dCc[k].store(dCw_ch + k * W);
        }
      }

      // du = D dy + delta <g, B>;  d(delta) = u <g, B> + <A, g * exp(delta A) * h_{t-1}>, through softplus.
      row_sums(ws.P1, len, ws.s1);
      row_sums(ws.P2, len, ws.s2);
      V dbias_acc(T(0));
      vec_loop<T>(len, [&](int64_t i, int64_t cnt) {
        const V s1 = vload(ws.s1 + i, cnt), u = vload(ws.u + i, cnt), dy = vload(ws.dy + i, cnt);
        const V du = at::vec::fmadd(V(Dd), dy, vload(ws.dl + i, cnt) * s1);
        V ddl = at::vec::fmadd(u, s1, vload(ws.s2 + i, cnt));
        if (p.delta_softplus) ddl = ddl * vsoftplus_grad(vload(ws.dl_raw + i, cnt));
        dD_acc = at::vec::fmadd(dy, u, dD_acc);  // lanes past len load as 0
        dbias_acc = dbias_acc + ddl;
        vstore(du, ws.s1 + i, cnt);
        vstore(ddl, ws.s2 + i, cnt);
      });
      store_row(ws.s1, len, p.du, p.input_dtype, (b * p.dim + d) * L + t0);
      store_row(ws.s2, len, p.ddelta, p.input_dtype, (b * p.dim + d) * L + t0);
      ws.dD[ch] += hsum(dD_acc);
      ws.dbias[ch] += hsum(dbias_acc);
    }
    // This unit's share of dB / dC for the chunk, back to (dstate, L) layout.
    const int64_t slot_off = unit_slot * n * L + t0;
    if (p.is_variable_B) transpose(ws.dBt.data(), npad, part.dB.data() + slot_off, L, len, n);
    if (p.is_variable_C) transpose(ws.dCt.data(), npad, part.dC.data() + slot_off, L, len, n);
  }

  T* dx0 = static_cast<T*>(p.dinitial_state);
  for (int64_t ch = 0; ch < nd; ++ch) {
    const int64_t bd = b * p.dim + d0 + ch;
    std::copy(ws.carry.data() + ch * npad, ws.carry.data() + ch * npad + n, dx0 + bd * n);
    std::copy(ws.dA.data() + ch * npad, ws.dA.data() + ch * npad + n, part.dA.data() + bd * n);
    if (!p.is_variable_B) std::copy(ws.dBw.data() + ch * npad, ws.dBw.data() + ch * npad + n, part.dBw.data() + bd * n);
    if (!p.is_variable_C) std::copy(ws.dCw.data() + ch * npad, ws.dCw.data() + ch * npad + n, part.dCw.data() + bd * n);
    part.dD[bd] = ws.dD[ch];
    part.dbias[bd] = ws.dbias[ch];
  }
}

// out[o * n + i] = sum over k < count of parts[(o * count + k) * n + i], for o < outer and i < n, adding
// in order of k whatever the number of threads.
template <typename T>
void sum_parts(const T* parts, int64_t outer, int64_t count, int64_t n, void* out, DType dt) {
  at::parallel_for(0, outer * n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    std::vector<T> acc;
    for (int64_t o = begin / n; o * n < end; ++o) {
      const int64_t i0 = std::max(begin, o * n) - o * n, i1 = std::min(end, (o + 1) * n) - o * n;
      const T* base = parts + o * count * n;
      acc.assign(base + i0, base + i1);
      for (int64_t k = 1; k < count; ++k)
        for (int64_t i = i0; i < i1; ++i) acc[i - i0] += base[k * n + i];
      store_row(acc.data(), i1 - i0, out, dt, o * n + i0);
    }
  });
}

template <typename T, int NV>
void scan_bwd_impl(const ScanBwdParams& p) {
  const Units units(p);
  const int64_t n = p.dstate, L = p.seqlen, BD = p.batch * p.dim;
  const int64_t npad = (n + Vec<T>::size() - 1) / Vec<T>::size() * Vec<T>::size();
  BwdPartials<T> part;
  part.dA.resize(BD * n);
  part.dD.resize(BD);
  part.dbias.resize(BD);
  if (!p.is_variable_B) part.dBw.resize(BD * n);
  if (!p.is_variable_C) part.dCw.resize(BD * n);
  if (p.is_variable_B) part.dB.resize(units.count * n * L);
  if (p.is_variable_C) part.dC.resize(units.count * n * L);

  at::parallel_for(0, units.count, units.grain, [&](int64_t begin, int64_t end) {
    BwdWorkspace<T> ws(npad, n);
    for (int64_t i = begin; i < end; ++i) scan_bwd_unit<T, NV>(p, units, i, ws, part);
  });

  // Sums over the batch (parameters) and over the channel blocks of a group (input-dependent B / C).
  sum_parts(part.dA.data(), 1, p.batch, p.dim * n, p.dA, p.weight_dtype);
  sum_parts(part.dD.data(), 1, p.batch, p.dim, p.dD, p.weight_dtype);
  sum_parts(part.dbias.data(), 1, p.batch, p.dim, p.ddelta_bias, p.weight_dtype);
  if (!p.is_variable_B) sum_parts(part.dBw.data(), 1, p.batch, p.dim * n, p.dB, p.weight_dtype);
  if (!p.is_variable_C) sum_parts(part.dCw.data(), 1, p.batch, p.dim * n, p.dC, p.weight_dtype);
  const int64_t batch_groups = p.batch * units.groups;
  if (p.is_variable_B) sum_parts(part.dB.data(), batch_groups, units.blocks_per_group, n * L, p.dB, p.input_dtype);
  if (p.is_variable_C) sum_parts(part.dC.data(), batch_groups, units.blocks_per_group, n * L, p.dC, p.input_dtype);
}

// Compile-time state width for the common sizes (dstate <= 64 in fp32); other sizes loop at run time.
template <typename T, template <typename, int> class Impl, typename Params>
void dispatch_vecs(const Params& p) {
  const int64_t nv = (p.dstate + Vec<T>::size() - 1) / Vec<T>::size();
  if constexpr (std::is_same_v<T, float>) {
    switch (nv) {
      case 1: return Impl<T, 1>::run(p);
      case 2: return Impl<T, 2>::run(p);
      case 3: return Impl<T, 3>::run(p);
      case 4: return Impl<T, 4>::run(p);
      default: return Impl<T, 0>::run(p);
    }
  } else {
    return nv == 1 ? Impl<T, 1>::run(p) : Impl<T, 0>::run(p);
  }
}

template <typename T, int NV>
struct FwdImpl {
  static void run(const ScanParams& p) { scan_fwd_impl<T, NV>(p); }
};
template <typename T, int NV>
struct BwdImpl {
  static void run(const ScanBwdParams& p) { scan_bwd_impl<T, NV>(p); }
};

void scan_fwd_cpu(const ScanParams& p) {
  if (p.weight_dtype == DType::kFloat64) return dispatch_vecs<double, FwdImpl>(p);
  dispatch_vecs<float, FwdImpl>(p);
}

void scan_bwd_cpu(const ScanBwdParams& p) {
  if (p.weight_dtype == DType::kFloat64) return dispatch_vecs<double, BwdImpl>(p);
  dispatch_vecs<float, BwdImpl>(p);
}

// ---- one decoding step ----

template <typename T>
void state_update_impl(const StateUpdateParams& p) {
  using V = Vec<T>;
  const int64_t n = p.dstate, cpg = p.dim / p.n_groups;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / n);  // ~32K state elements per task
  at::parallel_for(0, p.batch * p.dim, grain, [&](int64_t begin, int64_t end) {
    alignas(64) T h[kMaxDstate], A[kMaxDstate], B[kMaxDstate], C[kMaxDstate];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.dim, d = i % p.dim, g = d / cpg;
      const int64_t s_off = b * p.state_batch_stride + d * p.state_d_stride;
      load_row(p.state, p.state_dtype, s_off, p.state_n_stride, n, h);
      load_row(p.A, p.weight_dtype, d * p.A_d_stride, p.A_n_stride, n, A);
      load_row(p.B, p.input_dtype, b * p.B_batch_stride + g * p.B_group_stride, p.B_n_stride, n, B);
      load_row(p.C, p.input_dtype, b * p.C_batch_stride + g * p.C_group_stride, p.C_n_stride, n, C);
      T x, dt, bias = T(0), Dd = T(0);
      load_row(p.x, p.input_dtype, b * p.x_batch_stride + d * p.x_d_stride, 1, 1, &x);
      load_row(p.dt, p.input_dtype, b * p.dt_batch_stride + d * p.dt_d_stride, 1, 1, &dt);
      if (p.dt_bias) load_row(p.dt_bias, p.weight_dtype, d * p.dt_bias_stride, 1, 1, &bias);
      if (p.D) load_row(p.D, p.weight_dtype, d * p.D_stride, 1, 1, &Dd);
      dt += bias;
      if (p.dt_softplus) dt = dt > T(20) ? dt : std::log1p(std::exp(dt));
      V acc(T(0));
      vec_loop<T>(n, [&](int64_t k, int64_t cnt) {
        const V hk = at::vec::fmadd(vexp(V(dt) * vload(A + k, cnt)), vload(h + k, cnt),
                                    vload(B + k, cnt) * V(dt * x));
        vstore(hk, h + k, cnt);
        acc = at::vec::fmadd(hk, vload(C + k, cnt), acc);  // lanes past n load as 0
      });
      T y = hsum(acc) + Dd * x;
      if (p.z) {
        T z;
        load_row(p.z, p.input_dtype, b * p.z_batch_stride + d * p.z_d_stride, 1, 1, &z);
        y *= z / (T(1) + std::exp(-z));
      }
      if (p.state_n_stride == 1) {
        store_row(h, n, p.state, p.state_dtype, s_off);
      } else {
        for (int64_t k = 0; k < n; ++k) store_row(h + k, 1, p.state, p.state_dtype, s_off + k * p.state_n_stride);
      }
      store_row(&y, 1, p.out, p.input_dtype, i);
    }
  });
}

void state_update_cpu(const StateUpdateParams& p) {
  if (p.weight_dtype == DType::kFloat64) return state_update_impl<double>(p);
  state_update_impl<float>(p);
}

}  // namespace
}  // namespace fastdl::selective_scan

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  FASTDL_REGISTER_SELECTIVE_SCAN_IMPLS(m, fastdl::selective_scan::scan_fwd_cpu, fastdl::selective_scan::scan_bwd_cpu,
                                       fastdl::selective_scan::state_update_cpu);
}
