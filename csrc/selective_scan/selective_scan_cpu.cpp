// CPU selective scan (Mamba's S6 recurrence): forward, backward, and the one-step decoding update.
//
// Work is split into units of (batch, group of B/C, block of channels); at::parallel_for runs over
// units. Within a unit, time advances in spans of up to 1024 steps (forward; 128 in the backward):
//   - the span of input-dependent B and C (dstate x span) is transposed once into tiles with B_t
//     contiguous, and then read by every channel of the block;
//   - each channel runs the span in chunks of kChunk = 64 steps with its state h in SIMD registers
//     (dstate lanes, padded to whole vectors with A = B = C = 0, which keeps the padded lanes at 0),
//     streaming contiguous rows of u, delta, z and out;
//   - exp(delta A) is 2^(delta A log2 e), with log2 e folded into A once per channel (as mamba-ssm);
//   - y_t = <C_t, h_t> needs a horizontal sum per step: the per-step product vectors go to a
//     64 x 16 tile, and a shuffle-and-add tree gives 16 sums at a time.
// The forward stores h at the start of every chunk (the checkpoints). The backward walks the chunks in
// reverse: it recomputes the chunk's states from its checkpoint into an L1 buffer, then runs the adjoint
// recurrence g_{t-1} = exp(delta_t A) * g_t backwards through it. Memory stays O(batch*dim*(L + dstate)).
//
// Gradients of B / C (input dependent: summed over the channels of a group; per channel: summed over
// the batch), A, D and delta_bias are reductions. Each unit writes its own partial sums, and a second
// pass adds the partials in a fixed order: the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

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
// Channels per work unit: at least kBlock, and at most kMaxBlocksPerGroup blocks per group of B / C.
// Input-dependent dB / dC are summed over a group's blocks from one (dstate, L) partial per block, so
// the cap bounds that memory (batch x groups x 16 x dstate x L); B/C tiles are transposed once per unit
// and span, so larger blocks also amortise them better. Batch 2 x dim 1536 gives 32 units of 48
// channels. The partition depends on the shapes only, never on the thread count.
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxBlocksPerGroup = 16;

using cpu::DenormalsAreZero;
using cpu::hsum;
using cpu::load_row;
using cpu::prefetch_row;
using cpu::store_row;
using cpu::vec_loop;
using cpu::vload;
using cpu::vstore;

// 2^x. The scan folds log2(e) into A once per channel (as mamba-ssm's kernels do for exp2f), so the
// inner loop pays one multiply and this. fp32 with AVX512: split x = n + f with f in [-0.5, 0.5],
// 2^f from a degree-5 polynomial (relative error 2e-7, fitted to minimise the relative error on that
// interval), and scalef for the 2^n, which also turns large negative x into 0 without extra clamps.
// Elsewhere: at::vec's exp2 (Sleef, 1 ulp).
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 exp2_ps(const __m512 v) {
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.001326472731307149f), f, _mm512_set1_ps(0.009671512991189957f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550733581185341f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022242426872253f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931470036506653f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif
inline Vec<float> vexp2(const Vec<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return exp2_ps(x);
#else
  return x.exp2();
#endif
}
inline Vec<double> vexp2(const Vec<double>& x) { return x.exp2(); }

// exp(x) = 2^(x log2 e): with the polynomial above, ~2e-7 relative error in fp32 (Sleef's expf is ~1 ulp
// but costs several times as many instructions; the softplus and the silu gate run once per step). x is
// clamped to [-104, 89] first, so that exp(-inf) = 0 and exp(inf) = inf (2^f would be inf - inf = NaN).
template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  const Vec<T> xc = at::vec::minimum(at::vec::maximum(x, Vec<T>(T(-104))), Vec<T>(T(89)));
  return vexp2(xc * Vec<T>(T(1.4426950408889634)));
}
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  return Vec<T>(T(1)) / (Vec<T>(T(1)) + vexp(x.neg()));
}

// log1p(e) for e in [0, 1] as e q(e), q of degree 8 fitted to the relative error (2.1e-7 in fp32 Horner).
inline Vec<float> vlog1p_unit(const Vec<float>& e) {
  using V = Vec<float>;
  V q(0.0051058256067335606f);
  for (const float c : {-0.028991956263780594f, 0.07738073915243149f, -0.13590599596500397f, 0.1907130926847458f,
                        -0.2483394593000412f, 0.3331793546676636f, -0.4999943673610687f, 0.9999999403953552f})
    q = at::vec::fmadd(q, e, V(c));
  return e * q;
}

// torch.nn.functional.softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)). In fp32 as
// max(x, 0) + log1p(exp(-|x|)), exp(-|x|) in (0, 1]: one exp2 polynomial and one log1p polynomial,
// ~3e-7 relative error (instead of Sleef's expf + log1pf, ~15% of the forward's time).
template <typename T>
inline Vec<T> vsoftplus(const Vec<T>& x) {
  const Vec<T> thr(T(20));
  return Vec<T>::blendv(at::vec::minimum(x, thr).exp().log1p(), x, x > thr);
}
inline Vec<float> vsoftplus(const Vec<float>& x) {
  using V = Vec<float>;
  const V e = vexp(x.abs().neg());
  return V::blendv(at::vec::maximum(x, V(0.f)) + vlog1p_unit(e), x, x > V(20.f));
}
// Its derivative, as torch's softplus_backward: x > 20 ? 1 : sigmoid(x).
template <typename T>
inline Vec<T> vsoftplus_grad(const Vec<T>& x) {
  const Vec<T> thr(T(20));
  return Vec<T>::blendv(vsigmoid(at::vec::minimum(x, thr)), Vec<T>(T(1)), x > thr);
}


// out[t] = sum of the W lanes of row t of P ([len][W]).
inline void row_sums(const float* P, int64_t len, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  // 16 rows at a time with a reduction tree: 45 shuffles and adds give all 16 sums in one vector, in
  // row order (each level halves the vector count and doubles the lanes each partial sum covers).
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t m = std::min<int64_t>(16, len - t0);
    __m512 v[16];
    for (int64_t i = 0; i < 16; ++i) v[i] = i < m ? _mm512_loadu_ps(P + (t0 + i) * 16) : _mm512_setzero_ps();
    __m512 s[8], q[4], r[2];
    for (int i = 0; i < 8; ++i)  // 32-bit interleave of rows 2i, 2i+1
      s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // 64-bit interleave: each 128-bit lane holds rows 4i..4i+3
      const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
      q[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)  // add 128-bit lanes pairwise
      r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 sum = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_mask_storeu_ps(out + t0, static_cast<__mmask16>((1u << m) - 1), sum);
  }
#else
  constexpr int64_t W = Vec<float>::size();
  for (int64_t t = 0; t < len; ++t) out[t] = hsum(Vec<float>::loadu(P + t * W));
#endif
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
  for (int64_t i = 0; i < n; ++i) load_row(base, dt, offset + i * sn, sl, len, staging + i * len);
  transpose(staging, len, tile, npad, n, len);
}

// ---- work decomposition ----

struct Units {
  int64_t groups, channels_per_group, blocks_per_group, block, count, grain;
  explicit Units(const ScanParams& p) {
    groups = (p.is_variable_B || p.is_variable_C) ? p.n_groups : 1;
    channels_per_group = p.dim / groups;
    blocks_per_group = std::min((channels_per_group + kBlock - 1) / kBlock, kMaxBlocksPerGroup);
    block = blocks_per_group ? (channels_per_group + blocks_per_group - 1) / blocks_per_group : 0;
    count = p.batch * groups * blocks_per_group;
    // Units per task: at least ~256K state updates (~0.1 ms), so that small scans do not pay for
    // waking the thread pool (torch's own GRAIN_SIZE is 32K elements of an elementwise op).
    const int64_t unit_work = std::max<int64_t>(1, block * p.seqlen * p.dstate);
    grain = std::max<int64_t>(1, (int64_t{1} << 18) / unit_work);
  }
  // Unit i -> batch b, group g, channels [d0, d1).
  void decode(int64_t i, int64_t& b, int64_t& g, int64_t& j, int64_t& d0, int64_t& d1) const {
    j = i % blocks_per_group;
    g = (i / blocks_per_group) % groups;
    b = i / (blocks_per_group * groups);
    d0 = std::min(g * channels_per_group + j * block, (g + 1) * channels_per_group);
    d1 = std::min(d0 + block, (g + 1) * channels_per_group);
  }
};

template <typename T>
constexpr T kLog2e = T(1.4426950408889634);

// Steps whose B / C tiles are transposed at once. Each channel of a block then runs all the chunks of
// the span, streaming span contiguous steps of its rows: runs the hardware prefetcher follows, where
// a 64-step chunk per channel (256 B every 2 KB at L = 512) is not (forward: 15 -> 11 ms of CPU time
// at batch 2, dim 1536, L 512). The forward reads two tiles (B, C) of up to 16K elements, 64 KB in
// fp32: 1024 steps at dstate 16, from L2. The backward also accumulates into dB and dC tiles every
// step, which must stay in L1 (48 KB): four tiles of 2K elements, 128 steps at dstate 16 (with
// 1024-step tiles it took 42 ms instead of 29).
constexpr int64_t kFwdTileElems = 16384;
constexpr int64_t kBwdTileElems = 2048;
inline int64_t span_steps(int64_t npad, int64_t tile_elems) {
  return std::max<int64_t>(kChunk, tile_elems / npad / kChunk * kChunk);
}

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
  const int64_t u_off = b * p.u_batch_stride + d * p.u_d_stride + t0 * p.u_l_stride;
  const int64_t dl_off = b * p.delta_batch_stride + d * p.delta_d_stride + t0 * p.delta_l_stride;
  T bias = T(0);
  if (p.delta_bias) load_row(p.delta_bias, p.weight_dtype, d * p.delta_bias_stride, 1, 1, &bias);
  // Rows already in the math type and contiguous are read in place (the copy is fused into the pass
  // below); others are converted / gathered into u and dl_raw first.
  constexpr DType kMath = std::is_same_v<T, double> ? DType::kFloat64 : DType::kFloat32;
  const T* us = u;
  const T* ds = dl_raw;
  if (p.input_dtype == kMath && p.u_l_stride == 1) {
    us = static_cast<const T*>(p.u) + u_off;
  } else {
    load_row(p.u, p.input_dtype, u_off, p.u_l_stride, len, u);
  }
  if (p.input_dtype == kMath && p.delta_l_stride == 1) {
    ds = static_cast<const T*>(p.delta) + dl_off;
  } else {
    load_row(p.delta, p.input_dtype, dl_off, p.delta_l_stride, len, dl_raw);
  }
  vec_loop<T>(len, [&](int64_t i, int64_t cnt) {
    const Vec<T> uv = vload(us + i, cnt);
    if (us != u) vstore(uv, u + i, cnt);
    Vec<T> x = vload(ds + i, cnt) + Vec<T>(bias);
    vstore(x, dl_raw + i, cnt);
    if (p.delta_softplus) x = vsoftplus(x);
    vstore(x, dl + i, cnt);
    vstore(x * uv, dlu + i, cnt);
  });
}

// Prefetch of the rows that one channel's chunk reads and writes.
inline void prefetch_fwd_rows(const ScanParams& p, int64_t b, int64_t d, int64_t t0) {
  if (t0 < 0 || t0 >= p.seqlen) return;
  const int64_t len = std::min(kChunk, p.seqlen - t0);
  prefetch_row(p.u, p.input_dtype, b * p.u_batch_stride + d * p.u_d_stride + t0 * p.u_l_stride, p.u_l_stride, len);
  prefetch_row(p.delta, p.input_dtype, b * p.delta_batch_stride + d * p.delta_d_stride + t0 * p.delta_l_stride,
               p.delta_l_stride, len);
  prefetch_row(p.z, p.input_dtype, b * p.z_batch_stride + d * p.z_d_stride + t0 * p.z_l_stride, p.z_l_stride, len);
  prefetch_row<true>(p.out, p.input_dtype, (b * p.dim + d) * p.seqlen + t0, 1, len);
}

inline void prefetch_bwd_rows(const ScanBwdParams& p, int64_t b, int64_t d, int64_t t0) {
  if (t0 < 0 || t0 >= p.seqlen) return;
  const int64_t len = std::min(kChunk, p.seqlen - t0), row = (b * p.dim + d) * p.seqlen + t0;
  prefetch_row(p.u, p.input_dtype, b * p.u_batch_stride + d * p.u_d_stride + t0 * p.u_l_stride, p.u_l_stride, len);
  prefetch_row(p.delta, p.input_dtype, b * p.delta_batch_stride + d * p.delta_d_stride + t0 * p.delta_l_stride,
               p.delta_l_stride, len);
  prefetch_row(p.z, p.input_dtype, b * p.z_batch_stride + d * p.z_d_stride + t0 * p.z_l_stride, p.z_l_stride, len);
  prefetch_row(p.dout, p.input_dtype, b * p.dout_batch_stride + d * p.dout_d_stride + t0 * p.dout_l_stride,
               p.dout_l_stride, len);
  prefetch_row<true>(p.du, p.input_dtype, row, 1, len);
  prefetch_row<true>(p.ddelta, p.input_dtype, row, 1, len);
  prefetch_row<true>(p.dz, p.input_dtype, row, 1, len);
}

// ---- forward ----

#if defined(CPU_CAPABILITY_AVX512)
// One channel's chunk at dstate <= 16 in fp32 (one vector): h_t = 2^(delta_t A log2 e) h_{t-1} + delta_t u_t B_t,
// P[t] = C_t * h_t (summed across lanes by row_sums). Written on raw registers: in the generic loop below
// GCC kept the state array V h[1] on the stack, so every step's FMA waited on a store-to-load round trip
// (~45% of the forward's samples on the instruction after it).
inline void fwd_steps_1(float* hc, const float* Ac, const float* dl, const float* dlu, const float* Bp, int64_t bstep,
                        const float* Cp, int64_t cstep, int64_t len, float* P) {
  __m512 h = _mm512_loadu_ps(hc);
  const __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(Ac), _mm512_set1_ps(kLog2e<float>));
  for (int64_t t = 0; t < len; ++t) {
    const __m512 a = exp2_ps(_mm512_mul_ps(_mm512_set1_ps(dl[t]), a2));
    h = _mm512_fmadd_ps(a, h, _mm512_mul_ps(_mm512_loadu_ps(Bp + t * bstep), _mm512_set1_ps(dlu[t])));
    _mm512_storeu_ps(P + t * 16, _mm512_mul_ps(h, _mm512_loadu_ps(Cp + t * cstep)));
  }
  _mm512_storeu_ps(hc, h);
}
#endif

template <typename T>
struct FwdWorkspace {
  std::vector<T> Bt, Ct, staging, Apad, Bw, Cw, h;
  alignas(64) T u[kChunk], dl_raw[kChunk], dl[kChunk], dlu[kChunk], z[kChunk], y[kChunk];
  alignas(64) T P[kChunk * Vec<T>::size()];
  FwdWorkspace(int64_t npad, int64_t dstate, int64_t span, int64_t block)
      : Bt(span * npad, T(0)), Ct(span * npad, T(0)), staging(dstate * span), Apad(block * npad),
        Bw(block * npad), Cw(block * npad), h(block * npad) {}
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
  // fp32, dstate <= 16 on AVX512: the steps run in fwd_steps_1 on the state row hc.
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kOneVecF32 = std::is_same_v<T, float> && NV == 1;
#else
  constexpr bool kOneVecF32 = false;
#endif

  load_block_params(p, d0, nd, npad, ws.Apad.data(), ws.Bw.data(), ws.Cw.data());
  std::fill(ws.h.begin(), ws.h.end(), T(0));
  if (p.initial_state)
    for (int64_t ch = 0; ch < nd; ++ch)
      load_row(p.initial_state, p.weight_dtype,
               b * p.x0_batch_stride + (d0 + ch) * p.x0_d_stride, p.x0_n_stride, n, ws.h.data() + ch * npad);

  const int64_t span = span_steps(npad, kFwdTileElems);
  for (int64_t s0 = 0; s0 < L; s0 += span) {
    const int64_t slen = std::min(span, L - s0);
    if (p.is_variable_B)
      load_bc_tile(p.B, p.input_dtype, b * p.B_batch_stride + g * p.B_group_stride + s0 * p.B_l_stride,
                   p.B_n_stride, p.B_l_stride, n, slen, npad, ws.staging.data(), ws.Bt.data());
    if (p.is_variable_C)
      load_bc_tile(p.C, p.input_dtype, b * p.C_batch_stride + g * p.C_group_stride + s0 * p.C_l_stride,
                   p.C_n_stride, p.C_l_stride, n, slen, npad, ws.staging.data(), ws.Ct.data());

    for (int64_t ch = 0; ch < nd; ++ch) {
      const int64_t d = d0 + ch;
      // The start of the next channel's rows, or of the first channel's in the next span.
      const bool last_ch = ch + 1 == nd;
      prefetch_fwd_rows(p, b, last_ch ? d0 : d + 1, last_ch ? s0 + span : s0);
      T* hc = ws.h.data() + ch * npad;
      V A2[NV ? NV : kMaxVecs<T>];  // A2 = A * log2(e): exp(delta A) = 2^(delta A2)
      for (int k = 0; k < nv; ++k) A2[k] = V::loadu(ws.Apad.data() + ch * npad + k * W) * V(kLog2e<T>);
      T Dd = T(0);
      if (p.D) load_row(p.D, p.weight_dtype, d * p.D_stride, 1, 1, &Dd);
      // Per-channel B / C: the same row every step (step 0).
      const int64_t bstep = p.is_variable_B ? npad : 0, cstep = p.is_variable_C ? npad : 0;

      for (int64_t t0 = s0; t0 < s0 + slen; t0 += kChunk) {
        const int64_t len = std::min(kChunk, L - t0), c = t0 / kChunk;
        if (t0 + kChunk < s0 + slen) prefetch_fwd_rows(p, b, d, t0 + kChunk);
        std::copy(hc, hc + n, ckpt + ((b * p.dim + d) * p.n_chunks + c) * n);
        load_delta_chunk(p, b, d, t0, len, ws.u, ws.dl_raw, ws.dl, ws.dlu);
        const T* Bp = p.is_variable_B ? ws.Bt.data() + (t0 - s0) * npad : ws.Bw.data() + ch * npad;
        const T* Cp = p.is_variable_C ? ws.Ct.data() + (t0 - s0) * npad : ws.Cw.data() + ch * npad;
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (kOneVecF32)
          fwd_steps_1(hc, ws.Apad.data() + ch * npad, ws.dl, ws.dlu, Bp, bstep, Cp, cstep, len, ws.P);
#endif
        if constexpr (!kOneVecF32) {
          // The state is loaded here and stored after the chunk, so that it is live across no call (held
          // across the calls above, GCC kept it on the stack through the steps).
          V h[NV ? NV : kMaxVecs<T>];
          for (int k = 0; k < nv; ++k) h[k] = V::loadu(hc + k * W);
          for (int64_t t = 0; t < len; ++t) {
            const V dt(ws.dl[t]), dtu(ws.dlu[t]);
            const T* Bt = Bp + t * bstep;
            const T* Ct = Cp + t * cstep;
            V acc(T(0));
            for (int k = 0; k < nv; ++k) {
              const V a = vexp2(dt * A2[k]);
              h[k] = at::vec::fmadd(a, h[k], V::loadu(Bt + k * W) * dtu);
              acc = at::vec::fmadd(h[k], V::loadu(Ct + k * W), acc);
            }
            acc.store(ws.P + t * W);
          }
          for (int k = 0; k < nv; ++k) h[k].store(hc + k * W);
        }

        row_sums(ws.P, len, ws.y);
        if (p.z)
          load_row(p.z, p.input_dtype, b * p.z_batch_stride + d * p.z_d_stride + t0 * p.z_l_stride, p.z_l_stride,
                   len, ws.z);
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
    DenormalsAreZero daz;
    FwdWorkspace<T> ws(npad, p.dstate, span_steps(npad, kFwdTileElems), units.block);
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
  BwdWorkspace(int64_t npad, int64_t dstate, int64_t span, int64_t block)
      : Bt(span * npad, T(0)), Ct(span * npad, T(0)), dBt(span * npad), dCt(span * npad), staging(dstate * span), 
        Apad(block * npad), Bw(block * npad), Cw(block * npad), carry(block * npad), dA(block * npad),
        dBw(block * npad), dCw(block * npad), H(kChunk * npad), expA(kChunk * npad), dD(block), dbias(block) {}
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

  const int64_t span = span_steps(npad, kBwdTileElems);
  for (int64_t s0 = L > 0 ? (L - 1) / span * span : -1; s0 >= 0; s0 -= span) {
    const int64_t slen = std::min(span, L - s0);
    if (p.is_variable_B) {
      load_bc_tile(p.B, p.input_dtype, b * p.B_batch_stride + g * p.B_group_stride + s0 * p.B_l_stride,
                   p.B_n_stride, p.B_l_stride, n, slen, npad, ws.staging.data(), ws.Bt.data());
      std::fill(ws.dBt.begin(), ws.dBt.begin() + slen * npad, T(0));
    }
    if (p.is_variable_C) {
      load_bc_tile(p.C, p.input_dtype, b * p.C_batch_stride + g * p.C_group_stride + s0 * p.C_l_stride,
                   p.C_n_stride, p.C_l_stride, n, slen, npad, ws.staging.data(), ws.Ct.data());
      std::fill(ws.dCt.begin(), ws.dCt.begin() + slen * npad, T(0));
    }
    const int64_t c_first = s0 / kChunk, c_last = (s0 + slen - 1) / kChunk;
    for (int64_t ch = 0; ch < nd; ++ch) {
      const int64_t d = d0 + ch;
      for (int64_t c = c_last; c >= c_first; --c) {
        const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
        // The chunk processed next: this channel's previous one, or the next channel's last in this span,
        // or the first channel's last in the previous span.
        if (c > c_first) {
          prefetch_bwd_rows(p, b, d, t0 - kChunk);
        } else {
          prefetch_bwd_rows(p, b, ch + 1 < nd ? d + 1 : d0, ch + 1 < nd ? c_last * kChunk : t0 - kChunk);
        }
        load_delta_chunk(p, b, d, t0, len, ws.u, ws.dl_raw, ws.dl, ws.dlu);
        load_row(p.dout, p.input_dtype, b * p.dout_batch_stride + d * p.dout_d_stride + t0 * p.dout_l_stride,
                 p.dout_l_stride, len, ws.dout);
        std::copy(ckpt + ((b * p.dim + d) * p.n_chunks + c) * n, ckpt + ((b * p.dim + d) * p.n_chunks + c + 1) * n,
                  ws.h0);
        const T* Bp = p.is_variable_B ? ws.Bt.data() + (t0 - s0) * npad : ws.Bw.data() + ch * npad;
        const T* Cp = p.is_variable_C ? ws.Ct.data() + (t0 - s0) * npad : ws.Cw.data() + ch * npad;
        const int64_t bstep = p.is_variable_B ? npad : 0, cstep = p.is_variable_C ? npad : 0;
        const T* Ach = ws.Apad.data() + ch * npad;
        V A[NV ? NV : kMaxVecs<T>], A2[NV ? NV : kMaxVecs<T>];  // A2 = A * log2(e)
        for (int k = 0; k < nv; ++k) {
          A[k] = V::loadu(Ach + k * W);
          A2[k] = A[k] * V(kLog2e<T>);
        }

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
              const V a = vexp2(dt * A2[k]);
              h[k] = at::vec::fmadd(a, h[k], V::loadu(Bt + k * W) * dtu);
              a.store(Et + k * W);
              h[k].store(Ht + k * W);
              acc = at::vec::fmadd(h[k], V::loadu(Ct + k * W), acc);  // y, for dz; unused without z
            }
            acc.store(ws.P + t * W);
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
          T* carry_ch = ws.carry.data() + ch * npad;
          T* dA_ch = ws.dA.data() + ch * npad;
          for (int k = 0; k < nv; ++k) {
            carry[k] = V::loadu(carry_ch + k * W);
            dA[k] = V::loadu(dA_ch + k * W);
          }
          // dB_t / dC_t accumulate over the block's channels in tiles; per-channel B / C accumulate over
          // time in one row (step 0), like the reads of Bp / Cp: the loop has no branch on the form.
          T* dBp = p.is_variable_B ? ws.dBt.data() + (t0 - s0) * npad : ws.dBw.data() + ch * npad;
          T* dCp = p.is_variable_C ? ws.dCt.data() + (t0 - s0) * npad : ws.dCw.data() + ch * npad;
          for (int64_t t = len - 1; t >= 0; --t) {
            const V dy(ws.dy[t]), dt(ws.dl[t]), dtu(ws.dlu[t]);
            const T* Bt = Bp + t * bstep;
            const T* Ct = Cp + t * cstep;
            const T* Ht = ws.H.data() + t * npad;
            const T* Hprev = t > 0 ? Ht - npad : ws.h0;
            const T* Et = ws.expA.data() + t * npad;
            T* dBt = dBp + t * bstep;
            T* dCt = dCp + t * cstep;
            V sB(T(0)), sA(T(0));
            for (int k = 0; k < nv; ++k) {
              const V gk = at::vec::fmadd(V::loadu(Ct + k * W), dy, carry[k]);
              const V ht = V::loadu(Ht + k * W);
              at::vec::fmadd(dy, ht, V::loadu(dCt + k * W)).store(dCt + k * W);
              at::vec::fmadd(gk, dtu, V::loadu(dBt + k * W)).store(dBt + k * W);
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
    }
    // This unit's share of dB / dC for the span, back to (dstate, L) layout.
    const int64_t slot_off = unit_slot * n * L + s0;
    if (p.is_variable_B) transpose(ws.dBt.data(), npad, part.dB.data() + slot_off, L, slen, n);
    if (p.is_variable_C) transpose(ws.dCt.data(), npad, part.dC.data() + slot_off, L, slen, n);
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
// in order of k whatever the number of threads. With count = 0 (an empty batch, or a group with no
// channels) the sums are zero and `parts` is empty: it is not read.
template <typename T>
void sum_parts(const T* parts, int64_t outer, int64_t count, int64_t n, void* out, DType dt) {
  at::parallel_for(0, outer * n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    std::vector<T> acc;
    for (int64_t o = begin / n; o * n < end; ++o) {
      const int64_t i0 = std::max(begin, o * n) - o * n, i1 = std::min(end, (o + 1) * n) - o * n;
      if (count == 0) {
        acc.assign(i1 - i0, T(0));
        store_row(acc.data(), i1 - i0, out, dt, o * n + i0);
        continue;
      }
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
    DenormalsAreZero daz;
    BwdWorkspace<T> ws(npad, n, span_steps(npad, kBwdTileElems), units.block);
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
        const V hk = at::vec::fmadd(vexp2(V(dt * kLog2e<T>) * vload(A + k, cnt)), vload(h + k, cnt),
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
