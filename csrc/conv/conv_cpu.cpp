// CPU fused conv2d: implicit GEMM over tiles of output pixels, with the epilogue on the hot tile.
//
// Output pixels are flattened to m = (n, oh, ow), M = N * OH * OW, and cut into tiles of mt pixels. A
// tile runs, per group:
//   col[K, mt]   = the input patches of its pixels, K = Cin_g * KH * KW in weight order (ci, kh, kw),
//                  gathered from x whatever its strides (NCHW, channels_last, sliced) and converted to
//                  the math type (fp32; fp64 for fp64). A 1x1 / stride 1 / unpadded conv on an fp32
//                  NCHW tile inside one image skips the gather and reads x in place.
//   acc[Cout_g, mt] = W[Cout_g, K] @ col          (torch's BLAS: oneDNN brgemm for fp32 on AVX-512)
//   out = act(acc * scale + (shift + bias) + residual), vectorized along the tile's pixels, while acc is
//                  still in L1/L2, then stored in the output's layout.
// Tiles are independent and run under at::parallel_for. mt is chosen so col stays within ~2 MB (the
// GEMM blocks K internally in chunks of 512, so a col chunk is reused across all of W's row blocks) and
// so there are at least as many tiles as threads.
//
// Stride-1 convs skip the im2col (forward): x is zero-padded once into xpad [N, Cin, Hp, Wp], where
// output pixel (oh, ow), at flat index q = oh * Wp + ow, reads xpad's flat index q + kh*dh*Wp + kw*dw at
// tap (kh, kw). For one tap, a run of q is then a plain [Cin_g, L] matrix of xpad (row stride Hp * Wp),
// so each tap is one GEMM straight from xpad, accumulated over the taps into a 32 x 32 block of the tile
// that stays in registers / L1 (oneDNN's brgemm micro-kernel, one call per tap). The Wp - OW padding
// columns of each row are computed and dropped (4% of the work at 56x56, 29% at 7x7): cheaper than an
// im2col that writes and re-reads KH * KW copies of the input.
//
// fp32 math (fp32, bf16, fp16 inputs) with >= 16 channels per group in and out, except the NCHW 1x1 / stride 1
// case above from 64 output pixels per image on, takes the channels-last forward instead (forward_nhwc):
// C[pixels, Cout] = X^T W^T on a channels-last zero-padded copy of each image and the weights packed into
// [K, 64] panels (per call, or once by an inference module: packed_weight). One output row's pixels at one
// kernel tap are then a plain strided matrix (no im2col, none of the flat layout's Wp - OW wasted columns,
// any stride and dilation); brgemm runs M = OW pixels x N = 64 channels x K = Cin per tap (per kernel row:
// KW * Cin, when undilated), and the epilogue transposes the hot tile back to NCHW.
// Profile before it (one thread, N = 8, 2026-11-21): the brgemm micro-kernel runs these shapes at 220-230
// GFLOP/s in cache; the flat path reached 173 at 28x28x128 3x3 (wasted columns, a serial per-call weight
// reorder, a 1 KB-strided B at 14x14 that ran at 165) and the im2col path 143 at 7x7x512.
//
// The backward makes one pass over the same tiles: it regathers col, recomputes acc (one GEMM), and
// in the GEMMs' prologue turns dout into g = dout * act'(pre-activation) and gz = g * scale, summing
// dscale += g * acc and dshift += g on the way; then dW^T += col @ gz^T (into per-thread partials,
// summed in thread order at the end) and dcol = W^T @ gz, scattered back (col2im) into dx. Tiles two
// apart never touch the same input rows (tiles span at least R = (KH - 1) * dh / sh + 1 output rows),
// so the even tiles run in parallel, then the odd ones.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "common/cpu_utils.h"
#include "conv/conv_ops.h"
#include "lstm/lstm_gemm_cpu.h"

namespace fastdl::conv {
namespace {

using cpu::Vec;

using cpu::hsum;
using cpu::load_row;
using cpu::store_row;
using cpu::vload;
using cpu::vstore;

// ---- activations: value and derivative, both from the pre-activation z ------------------------------

template <Activation A, typename T>
inline Vec<T> act_fwd(const Vec<T>& z, const Vec<T>& slope) {
  using V = Vec<T>;
  const V zero(T(0)), one(T(1));
  if constexpr (A == Activation::kRelu) return at::vec::maximum(z, zero);
  if constexpr (A == Activation::kLeakyRelu) return V::blendv(z * slope, z, z > zero);
  if constexpr (A == Activation::kSilu) return z / (one + z.neg().exp());
  if constexpr (A == Activation::kGelu) return V(T(0.5)) * z * (one + (z * V(T(M_SQRT1_2))).erf());
  if constexpr (A == Activation::kSigmoid) return one / (one + z.neg().exp());
  if constexpr (A == Activation::kTanh) return z.tanh();
  return z;
}

// d act / dz. relu and leaky_relu take the z <= 0 branch at 0, as torch's threshold / leaky backward.
template <Activation A, typename T>
inline Vec<T> act_grad(const Vec<T>& z, const Vec<T>& slope) {
  using V = Vec<T>;
  const V zero(T(0)), one(T(1));
  if constexpr (A == Activation::kRelu) return V::blendv(zero, one, z > zero);
  if constexpr (A == Activation::kLeakyRelu) return V::blendv(slope, one, z > zero);
  if constexpr (A == Activation::kSilu) {
    const V s = one / (one + z.neg().exp());
    return s * (one + z * (one - s));
  }
  if constexpr (A == Activation::kGelu) {
    // Phi(z) + z * phi(z), phi the standard normal density.
    const V cdf = V(T(0.5)) * (one + (z * V(T(M_SQRT1_2))).erf());
    const V pdf = (V(T(-0.5)) * z * z).exp() * V(T(0.3989422804014327));
    return cdf + z * pdf;
  }
  if constexpr (A == Activation::kSigmoid) {
    const V s = one / (one + z.neg().exp());
    return s * (one - s);
  }
  if constexpr (A == Activation::kTanh) {
    const V t = z.tanh();
    return one - t * t;
  }
  return one;
}

// Runs f with the activation as a compile-time constant.
template <typename F>
inline void act_switch(Activation a, F&& f) {
  switch (a) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kLeakyRelu: return f(std::integral_constant<Activation, Activation::kLeakyRelu>{});
    case Activation::kSilu: return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kSigmoid: return f(std::integral_constant<Activation, Activation::kSigmoid>{});
    case Activation::kTanh: return f(std::integral_constant<Activation, Activation::kTanh>{});
  }
}

#if FASTDL_RNN_BRGEMM
// store(j, column j, row mask) for the columns j < cols of src[i * lds + j], i < rows (both <= 16): a 16 x 16
// register transpose (unpack ps, unpack pd, two 128-bit lane shuffles: 64 shuffles for 256 values), masked
// loads at the edges. transpose16: dst[j * ldd + i] = src[i * lds + j]. Inline: torch's transpose_mxn_16x16
// is an out-of-line call with a check per block, and was 16% of the 56x56x64 forward in perf.
template <typename Store>
inline void transpose16_to(const float* src, int64_t lds, int rows, int cols, Store&& store) {
  __m512 r[16], t[16];
  const __mmask16 cm = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * lds) : _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  const auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  const auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  // r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = lo(t[4 * i], t[4 * i + 2]), r[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]), r[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88), t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {  // r[j] = column j
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88), r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  const __mmask16 rm = rows >= 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  for (int j = 0; j < cols; ++j) store(j, r[j], rm);
}

inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd, int rows, int cols) {
  transpose16_to(src, lds, rows, cols,
                 [&](int j, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(dst + j * ldd, m, v); });
}

// transpose16 over a [rows, cols] matrix of any size.
inline void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i += 16)
    for (int64_t j = 0; j < cols; j += 16)
      transpose16(src + i * lds + j, lds, dst + j * ldd + i, ldd, int(std::min<int64_t>(16, rows - i)),
                  int(std::min<int64_t>(16, cols - j)));
}

// The weight panels of the channels-last forward (see Conv::forward_nhwc), for Cout_g output channels per
// group in column blocks of panel_cols(Cout_g):
//   wc[g, j, k, o] = w[g * Cout_g + j * Nb + o, ci, kh, kw] with k = (kh * KW + kw) * Cin_g + ci, zero for
//   o past Cout_g: per group, column block j of Nb output channels is a row-major [K, Nb] brgemm B operand
//   whose rows [tap * Cin_g, (tap + 1) * Cin_g) are one tap's [Cin_g, Nb] weights.
// Packed per call, or once by conv2d_pack_weight for inference modules that pass it back as packed_weight.
// Nb: 4 AVX-512 vectors (a 6 x 64 register block), fewer for narrow groups.
inline int64_t panel_cols(int64_t cout_g) { return std::min<int64_t>(64, (cout_g + 15) / 16 * 16); }

void pack_weight_panels(const float* w, int64_t groups, int64_t cout_g, int64_t cin_g, int64_t taps, float* wc) {
  const int64_t Nb = panel_cols(cout_g), K = cin_g * taps, ncb = (cout_g + Nb - 1) / Nb, nob = Nb / 16;
  // Items of 16 output channels: per input channel, the [16, taps] block of w (row stride K) is transposed in
  // registers into the 64-byte pieces of taps panel rows. Element by element the 9.4 MB of 7x7x512 3x3 took
  // ~2 ms, now ~1.1 (one thread; a plain copy of as many bytes takes 0.2, the 16 x 16 transposes' shuffles
  // are the limit); the panel rows kept in w's own (ci, tap) order pack faster but made the per-tap B
  // operand strided, and the GEMMs lost more (14x14x256 3x3: 8.1 -> 9.3 ms).
  at::parallel_for(0, groups * ncb * nob, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gj = item / nob, g = gj / ncb, j = gj % ncb, o0 = item % nob * 16;
      const int64_t rows = std::clamp<int64_t>(cout_g - j * Nb - o0, 0, 16);
      float* dst = wc + gj * K * Nb + o0;
      if (rows < 16) {  // zero past Cout_g (the masked stores leave those lanes alone)
        for (int64_t k = 0; k < K; ++k) std::fill_n(dst + k * Nb, 16, 0.f);
      }
      if (rows == 0) continue;
      const float* src = w + (g * cout_g + j * Nb + o0) * K;
      for (int64_t ci = 0; ci < cin_g; ++ci) transpose(src + ci * taps, K, dst + ci * Nb, cin_g * Nb, rows, taps);
    }
  });
}
#endif

#if FASTDL_RNN_BRGEMM
// Per-thread scratch buffers of the nhwc path (weight panels, col chunks, tiles), 64-byte aligned, kept
// between calls so that their pages are touched once. A buffer grows to the largest request its thread has
// seen and is kept until the thread exits.
enum Scratch : int { kPanels = 0, kCol, kTile, kScratchSlots };
inline float* scratch(Scratch slot, int64_t n) {
  static thread_local std::vector<float> bufs[kScratchSlots];
  std::vector<float>& b = bufs[slot];
  if (int64_t(b.size()) < n + 16) b.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(b.data()) + 63) & ~uintptr_t(63));
}
#endif

// ---- the tiled implicit GEMM ----------------------------------------------------------------------

template <typename T>
struct Conv {
  const Conv2dParams& p;
  int64_t cin_g, cout_g, K, ohw, M, mt, ntiles;
  std::vector<T> w_own;  // [Cout, K] math-type copy of the weight, only when its dtype is not T
  const T* w;            // [Cout, K] math-type weight: p.weight itself (contiguous) when its dtype is T
  std::vector<T> s, t;  // [Cout] epilogue scale and shift + bias
  bool direct_1x1;     // read col in place from an fp32 / fp64 NCHW x (see direct_col)
  bool flat = false;   // stride-1 forward from a padded copy of x, without im2col (see forward_flat)
  int64_t Hp = 0, Wp = 0;
  bool nhwc = false;   // fp32 forward on a channels-last padded copy of x (see forward_nhwc)
  int64_t Hx = 0, Wx = 0, Nb = 0;

  Conv(const Conv2dParams& p_, int64_t min_rows) : p(p_) {
    cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
    K = cin_g * p.kernel_h * p.kernel_w, ohw = p.out_h * p.out_w, M = p.batch * ohw;
    // The op passes a contiguous weight; an fp32 / fp64 one is used in place (7x7x512 3x3: 9.4 MB not copied
    // per call).
    if (std::is_same_v<T, float> ? p.input_dtype == DType::kFloat32 : p.input_dtype == DType::kFloat64) {
      w = static_cast<const T*>(p.weight);
    } else {
      w_own.resize(p.out_channels * K);
      load_row(p.weight, p.input_dtype, 0, 1, p.out_channels * K, w_own.data());
      w = w_own.data();
    }
    s.assign(p.out_channels, T(1)), t.assign(p.out_channels, T(0));
    const T* scale = static_cast<const T*>(p.scale);
    const T* shift = static_cast<const T*>(p.shift);
    const T* bias = static_cast<const T*>(p.bias);
    for (int64_t c = 0; c < p.out_channels; ++c) {
      if (scale) s[c] = scale[c];
      if (shift) t[c] += shift[c];
      if (bias) t[c] += bias[c];
    }
    // Tile: col (K x mt math values) within ~2 MB, mt a multiple of 16 in [64, 1024], at least one tile per
    // thread, and at least min_rows whole output rows (the backward's col2im needs them).
    const int64_t col_budget = (int64_t(2) << 20) / int64_t(sizeof(T));
    mt = std::clamp<int64_t>(col_budget / std::max<int64_t>(K, 1) / 16 * 16, 64, 1024);
    const int64_t threads = at::get_num_threads();
    mt = std::min(mt, std::max<int64_t>(64, (M + threads - 1) / threads));
    mt = std::max(mt, min_rows * p.out_w);
    mt = std::max<int64_t>(1, std::min(mt, M));
    ntiles = M == 0 ? 0 : (M + mt - 1) / mt;
    // Balance: a tile count that is a multiple of the threads, with equal tiles (7x7x512 3x3, M = 392:
    // 4 tiles of 98 instead of 112, 112 | 112, 56, which left one thread 14% idle).
    if (ntiles > 1 && min_rows * p.out_w <= (M + threads - 1) / threads) {
      const int64_t balanced = (ntiles + threads - 1) / threads * threads;
      const int64_t mt_b = (M + balanced - 1) / balanced;
      if (mt_b >= min_rows * p.out_w) mt = mt_b, ntiles = (M + mt - 1) / mt;
    }
    direct_1x1 = p.kernel_h == 1 && p.kernel_w == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_top == 0 &&
                 p.pad_left == 0 && p.x_stride[3] == 1 && (p.in_h == 1 || p.x_stride[2] == p.in_w) &&
                 (std::is_same_v<T, float> ? p.input_dtype == DType::kFloat32 : p.input_dtype == DType::kFloat64);
    // Below 64 output pixels per image (7x7) an fp32 1x1 takes the channels-last path instead: 7x7x512, N = 8,
    // 2 threads, interleaved A/B against eager conv -> BN -> ReLU (2026-11-21, load 1.5): 0.70x there
    // against 0.80-0.84x for the in-place GEMM; at 14x14x256 the in-place GEMM stays ahead (0.46-0.50x
    // against 0.48-0.51x), also with the weights packed beforehand (packed_weight), in the bench harness's
    // order of cases (4 repeats of medians of 30, x eager: 0.87-0.92 in place, 0.86-1.01 channels-last).
#if FASTDL_RNN_BRGEMM
    if (std::is_same_v<T, float> && ohw < 64 && cin_g >= 16 && cout_g >= 16) direct_1x1 = false;
#endif
    // Flat only from 14 columns on: measured single-thread at N=8 (benchmarks/RESULTS.md), it beats the
    // im2col path by 10-20% at 56x56x64 .. 14x14x256, and is 2x slower at 7x7x512, where the extra columns
    // are 29% of the work and each tile re-reads the 9.4 MB of weights.
    if (p.stride_h == 1 && p.stride_w == 1 && !direct_1x1 && p.out_w >= 14) {
      flat = true;
      Hp = p.out_h + (p.kernel_h - 1) * p.dilation_h;  // = H + top + bottom padding at stride 1
      Wp = p.out_w + (p.kernel_w - 1) * p.dilation_w;
    }
#if FASTDL_RNN_BRGEMM
    // fp32 math with at least 16 channels in and out per group: the channels-last path, any stride / dilation.
    if constexpr (std::is_same_v<T, float>) {
      if (!direct_1x1 && cin_g >= 16 && cout_g >= 16) {
        nhwc = true, flat = false;
        Hx = (p.out_h - 1) * p.stride_h + (p.kernel_h - 1) * p.dilation_h + 1;
        Wx = (p.out_w - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1;
        Nb = panel_cols(cout_g);
      }
    }
#endif
  }

  // For a 1x1 unpadded stride-1 conv on an NCHW math-type x, col of a tile inside one image is x itself:
  // rows ci at stride x_stride[1]. Returns nullptr when the tile crosses images.
  const T* direct_col(int64_t g, int64_t m0, int64_t n_pix, int64_t& ld) const {
    if (!direct_1x1 || m0 / ohw != (m0 + n_pix - 1) / ohw) return nullptr;
    ld = p.x_stride[1];
    const int64_t n = m0 / ohw, pix = m0 % ohw;
    return static_cast<const T*>(p.x) + n * p.x_stride[0] + g * cin_g * p.x_stride[1] + pix;
  }

  // Walks the output rows of pixels [m0, m0 + n_pix) inside one kernel tap: f(j, n, oh, ow0, cnt) for each
  // run of cnt pixels of one output row starting at column j of the tile.
  template <typename F>
  void for_rows(int64_t m0, int64_t n_pix, F&& f) const {
    int64_t j = 0;
    while (j < n_pix) {
      const int64_t m = m0 + j, n = m / ohw, pq = m % ohw, oh = pq / p.out_w, ow0 = pq % p.out_w;
      const int64_t cnt = std::min(p.out_w - ow0, n_pix - j);
      f(j, n, oh, ow0, cnt);
      j += cnt;
    }
  }

  // The input columns one kernel tap reads for output columns [ow0, ow0 + cnt): iw = ow * sw - a, valid
  // for ow in [lo, hi).
  void tap_range(int64_t kw, int64_t ow0, int64_t cnt, int64_t& a, int64_t& lo, int64_t& hi) const {
    const int64_t sw = p.stride_w;
    a = p.pad_left - kw * p.dilation_w;
    lo = a <= 0 ? 0 : (a + sw - 1) / sw;
    hi = p.in_w - 1 + a < 0 ? 0 : (p.in_w - 1 + a) / sw + 1;
    lo = std::clamp(lo, ow0, ow0 + cnt);
    hi = std::clamp(hi, lo, ow0 + cnt);
  }

  // col[k, j] = x at tap k = (ci, kh, kw) of group g for tile pixel j; zero in the padding.
  void build_col(int64_t g, int64_t m0, int64_t n_pix, T* col) const {
    const int64_t KH = p.kernel_h, KW = p.kernel_w, sw = p.stride_w;
    for (int64_t ci = 0; ci < cin_g; ++ci) {
      const int64_t c_off = (g * cin_g + ci) * p.x_stride[1];
      for (int64_t kh = 0; kh < KH; ++kh) {
        for (int64_t kw = 0; kw < KW; ++kw) {
          T* dst = col + ((ci * KH + kh) * KW + kw) * n_pix;
          for_rows(m0, n_pix, [&](int64_t j, int64_t n, int64_t oh, int64_t ow0, int64_t cnt) {
            const int64_t ih = oh * p.stride_h - p.pad_top + kh * p.dilation_h;
            if (ih < 0 || ih >= p.in_h) {
              std::fill(dst + j, dst + j + cnt, T(0));
              return;
            }
            int64_t a, lo, hi;
            tap_range(kw, ow0, cnt, a, lo, hi);
            std::fill(dst + j, dst + j + (lo - ow0), T(0));
            if (hi > lo) {
              load_row(p.x, p.input_dtype,
                       n * p.x_stride[0] + c_off + ih * p.x_stride[2] + (lo * sw - a) * p.x_stride[3],
                       sw * p.x_stride[3], hi - lo, dst + j + (lo - ow0));
            }
            std::fill(dst + j + (hi - ow0), dst + j + cnt, T(0));
          });
        }
      }
    }
  }

  // dx[n, ci, ih, iw] += dcol[k, j], the transpose of build_col; dx is math-type NCHW contiguous.
  void col2im(int64_t g, int64_t m0, int64_t n_pix, const T* dcol, T* dx) const {
    const int64_t KH = p.kernel_h, KW = p.kernel_w, sw = p.stride_w, H = p.in_h, W = p.in_w;
    for (int64_t ci = 0; ci < cin_g; ++ci) {
      const int64_t c = g * cin_g + ci;
      for (int64_t kh = 0; kh < KH; ++kh) {
        for (int64_t kw = 0; kw < KW; ++kw) {
          const T* src = dcol + ((ci * KH + kh) * KW + kw) * n_pix;
          for_rows(m0, n_pix, [&](int64_t j, int64_t n, int64_t oh, int64_t ow0, int64_t cnt) {
            const int64_t ih = oh * p.stride_h - p.pad_top + kh * p.dilation_h;
            if (ih < 0 || ih >= H) return;
            int64_t a, lo, hi;
            tap_range(kw, ow0, cnt, a, lo, hi);
            T* d = dx + ((n * p.in_channels + c) * H + ih) * W + (lo * sw - a);
            const T* s_ = src + j + (lo - ow0);
            if (sw == 1) {
              at::vec::map2([](Vec<T> u, Vec<T> v) { return u + v; }, d, d, s_, hi - lo);
            } else {
              for (int64_t i = 0; i < hi - lo; ++i) d[i * sw] += s_[i];
            }
          });
        }
      }
    }
  }

  // acc[Cout_g, n_pix] = W_g @ col for group g of the tile at m0.
  void tile_gemm(int64_t g, int64_t m0, int64_t n_pix, T* colbuf, T* acc, const T*& col, int64_t& ldcol) const {
    col = direct_col(g, m0, n_pix, ldcol);
    if (!col) {
      build_col(g, m0, n_pix, colbuf);
      col = colbuf, ldcol = n_pix;
    }
    rnn::cpu::gemm<T>(false, false, cout_g, n_pix, K, w + g * cout_g * K, K, col, ldcol, false, acc, n_pix,
                      /*parallel=*/false);
  }

  // Epilogue on cnt contiguous values of channel c for pixels pix .. pix + cnt of image n, in place, then
  // stored: v = act(v * scale + shift' + residual).
  template <Activation A>
  void epilogue_run(T* v, int64_t cnt, int64_t c, int64_t n, int64_t pix, T* rbuf) const {
    const Vec<T> slope(T(p.slope)), sc(s[c]), sh(t[c]);
    if (p.residual) {
      load_row(p.residual, p.input_dtype, n * p.res_stride_n + c * p.res_stride_c + pix * p.res_stride_p,
           p.res_stride_p, cnt, rbuf);
    }
    for (int64_t j = 0; j < cnt; j += Vec<T>::size()) {
      const int64_t k = std::min<int64_t>(Vec<T>::size(), cnt - j);
      Vec<T> z = at::vec::fmadd(vload(v + j, k), sc, sh);
      if (p.residual) z = z + vload(rbuf + j, k);
      vstore(act_fwd<A>(z, slope), v + j, k);
    }
    store_row(v, cnt, p.out, p.input_dtype, n * p.out_stride_n + c * p.out_stride_c + pix * p.out_stride_p,
          p.out_stride_p);
  }

  template <Activation A>
  void forward() const {
#if FASTDL_RNN_BRGEMM
    if constexpr (std::is_same_v<T, float>) {
      if (nhwc) return forward_nhwc<A>();
    }
#endif
    if (flat) return forward_flat<A>();
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> colbuf(direct_1x1 && ohw >= 64 ? 0 : K * mt), acc(cout_g * mt), rbuf(mt);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t m0 = tile * mt, n_pix = std::min(mt, M - m0);
        for (int64_t g = 0; g < p.groups; ++g) {
          if (direct_1x1 && ohw >= 64) {
            // 1x1: x is col already, one GEMM per image the tile spans (no gather when a tile crosses images:
            // at 28x28 and 14x14 every tile does). Below 64 pixels per image (7x7: 49) the per-image GEMMs
            // are too narrow, and tile_gemm gathers the tile into one contiguous col (0.4 MB at 7x7x512).
            for_images(m0, n_pix, [&](int64_t j, int64_t n, int64_t pix, int64_t cnt) {
              const T* xs = static_cast<const T*>(p.x) + n * p.x_stride[0] + g * cin_g * p.x_stride[1] + pix;
              rnn::cpu::gemm<T>(false, false, cout_g, cnt, K, w + g * cout_g * K, K, xs, p.x_stride[1], false,
                                acc.data() + j, n_pix, /*parallel=*/false);
            });
          } else {
            const T* col;
            int64_t ldcol;
            tile_gemm(g, m0, n_pix, colbuf.data(), acc.data(), col, ldcol);
          }
          for (int64_t oc = 0; oc < cout_g; ++oc) {
            T* row = acc.data() + oc * n_pix;
            for_images(m0, n_pix, [&](int64_t j, int64_t n, int64_t pix, int64_t cnt) {
              epilogue_run<A>(row + j, cnt, g * cout_g + oc, n, pix, rbuf.data());
            });
          }
        }
      }
    });
  }

  // xpad[n, c] = x[n, c] with the padding as zeros, in the math type; [N, Cin, Hp, Wp].
  std::vector<T> pad_input() const {
    const int64_t H = p.in_h, W = p.in_w, pt = p.pad_top, pl = p.pad_left;
    std::vector<T> xpad(p.batch * p.in_channels * Hp * Wp);
    at::parallel_for(0, p.batch * p.in_channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / p.in_channels, c = nc % p.in_channels;
        T* plane = xpad.data() + nc * Hp * Wp;
        for (int64_t r = 0; r < Hp; ++r) {
          T* row = plane + r * Wp;
          const int64_t ih = r - pt;
          if (ih < 0 || ih >= H) {
            std::fill(row, row + Wp, T(0));
            continue;
          }
          std::fill(row, row + pl, T(0));
          load_row(p.x, p.input_dtype, n * p.x_stride[0] + c * p.x_stride[1] + ih * p.x_stride[2], p.x_stride[3], W,
               row + pl);
          std::fill(row + pl + W, row + Wp, T(0));
        }
      }
    });
    return xpad;
  }

  template <Activation A>
  void forward_flat() const {
    const int64_t KH = p.kernel_h, KW = p.kernel_w, taps = KH * KW, plane = Hp * Wp, C = p.out_channels;
    const std::vector<T> xpad = pad_input();
    // wt[tap][co][ci]: each tap's weights as a row-major [Cout, Cin_g] matrix.
    std::vector<T> wt(taps * C * cin_g);
    for (int64_t co = 0; co < C; ++co)
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t tap = 0; tap < taps; ++tap) wt[(tap * C + co) * cin_g + ci] = w[co * K + ci * taps + tap];
    std::vector<int64_t> tap_off(taps);
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) tap_off[kh * KW + kw] = kh * p.dilation_h * Wp + kw * p.dilation_w;
    // Tile: L flat pixels of one image, the accumulator [Cout_g, L] within ~256 KB.
    const int64_t qlen = (p.out_h - 1) * Wp + p.out_w;
    const int64_t L = std::min(qlen, std::clamp<int64_t>((int64_t(64) << 10) / std::max<int64_t>(cout_g, 1) / 32 * 32,
                                                         32, 1024));
    const int64_t per_image = (qlen + L - 1) / L;
    constexpr int64_t kBlock = 32;
    at::parallel_for(0, p.batch * per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(cout_g * L), rbuf(L);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n = tile / per_image, q0 = (tile % per_image) * L, len = std::min(L, qlen - q0);
        for (int64_t g = 0; g < p.groups; ++g) {
          const T* xg = xpad.data() + (n * p.in_channels + g * cin_g) * plane + q0;
          // Row blocks outer: a 32-row block of every tap's weights (32 x Cin_g x taps) stays in L2 while
          // the tile's columns stream past it.
          for (int64_t m0 = 0; m0 < cout_g; m0 += kBlock) {
            const int64_t mb = std::min(kBlock, cout_g - m0);
            for (int64_t n0 = 0; n0 < len; n0 += kBlock) {
              const int64_t nb = std::min(kBlock, len - n0);
              for (int64_t tap = 0; tap < taps; ++tap) {
                const T* a = wt.data() + (tap * C + g * cout_g + m0) * cin_g;
                const T* b = xg + tap_off[tap] + n0;
                T* c = acc.data() + m0 * L + n0;
#if FASTDL_RNN_BRGEMM
                if constexpr (std::is_same_v<T, float>) {
                  at::native::cpublas::brgemm(mb, nb, cin_g, cin_g, plane, L, tap > 0, a, b, c, /*is_vnni=*/false);
                  continue;
                }
#endif
                rnn::cpu::gemm<T>(false, false, mb, nb, cin_g, a, cin_g, b, plane, tap > 0, c, L, /*parallel=*/false);
              }
            }
          }
          // Epilogue per output row of the tile, skipping the Wp - OW padding columns.
          for (int64_t oc = 0; oc < cout_g; ++oc) {
            T* row = acc.data() + oc * L;
            for (int64_t q = q0; q < q0 + len;) {
              const int64_t oh = q / Wp, ow = q % Wp;
              const int64_t row_end = std::min(oh * Wp + Wp, q0 + len);
              if (ow < p.out_w) {
                const int64_t cnt = std::min(p.out_w, row_end - oh * Wp) - ow;
                epilogue_run<A>(row + (q - q0), cnt, g * cout_g + oc, n, oh * p.out_w + ow, rbuf.data());
              }
              q = row_end;
            }
          }
        }
      }
#if FASTDL_RNN_BRGEMM
      if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
    });
  }

#if FASTDL_RNN_BRGEMM
  // xi[r, q, c] = x[n, c, r - pad_top, q - pad_left], zero outside x: image n as the fp32 channels-last padded
  // copy [Hx, Wx, Cin] that the nhwc path reads (Hx, Wx: the rows and columns the output reads).
  void pack_image(int64_t n, float* xi) const {
    const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, pt = p.pad_top, pl = p.pad_left;
    const int64_t lo = std::min(pl, Wx), hi = std::clamp(pl + W, lo, Wx);  // columns [lo, hi) come from x
    std::vector<float> tmp;
    for (int64_t r = 0; r < Hx; ++r) {
      const int64_t ih = r - pt;
      float* row = xi + r * Wx * C;
      if (ih < 0 || ih >= H) {
        std::fill(row, row + Wx * C, 0.f);
        continue;
      }
      std::fill(row, row + lo * C, 0.f);
      std::fill(row + hi * C, row + Wx * C, 0.f);
      const int64_t base = n * p.x_stride[0] + ih * p.x_stride[2] + (lo - pl) * p.x_stride[3];
      if (p.x_stride[1] == 1) {  // channels_last x: each pixel's channels are contiguous
        for (int64_t q = lo; q < hi; ++q) {
          load_row(p.x, p.input_dtype, base + (q - lo) * p.x_stride[3], 1, C, row + q * C);
        }
      } else if (p.input_dtype == DType::kFloat32 && p.x_stride[3] == 1) {
        // [C, hi - lo] rows of x -> [hi - lo, C]
        transpose(static_cast<const float*>(p.x) + base, p.x_stride[1], row + lo * C, C, C, hi - lo);
      } else {
        tmp.resize(hi - lo);
        for (int64_t c = 0; c < C; ++c) {
          load_row(p.x, p.input_dtype, base + c * p.x_stride[1], p.x_stride[3], hi - lo, tmp.data());
          for (int64_t q = lo; q < hi; ++q) row[q * C + c] = tmp[q - lo];
        }
      }
    }
  }

  // The batch's packed images, [N, Hx, Wx, Cin], one buffer per call. Each image is packed by the first thread
  // that needs it, right before that thread's items on it (so it is still in that core's L2); a thread that
  // needs an image another one is packing waits for it. One batch-sized buffer per call rather than a cached
  // per-thread one: like the flat path's xpad before it, it keeps glibc's mmap threshold above the output's
  // size. With only cached buffers every 6.4 MB output of 56x56x64 became a fresh mmap again when run
  // interleaved with eager torch (1536 page faults per call, eager's calls 4672; 879 and 364 with the flat
  // path), ~1.3 ms more per call on two threads.
  struct PackedImages {
    int64_t plane;
    std::unique_ptr<float[]> data;
    std::unique_ptr<std::atomic<int>[]> state;  // 0 not packed, 1 being packed, 2 ready
  };
  PackedImages packed_images() const {
    const int64_t plane = Hx * Wx * p.in_channels;
    return {plane, std::unique_ptr<float[]>(new float[p.batch * plane]),
            std::unique_ptr<std::atomic<int>[]>(new std::atomic<int>[p.batch]())};
  }
  const float* image(PackedImages& pk, int64_t n) const {
    float* xi = pk.data.get() + n * pk.plane;
    std::atomic<int>& st = pk.state[n];
    if (st.load(std::memory_order_acquire) == 2) return xi;
    int expected = 0;
    if (st.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      pack_image(n, xi);
      st.store(2, std::memory_order_release);
    } else {
      while (st.load(std::memory_order_acquire) != 2) std::this_thread::yield();
    }
    return xi;
  }

  // The weight panels (pack_weight_panels): the caller's packed_weight when it passed one (an inference
  // module's, packed once: at 7x7x512 3x3 the pack is 9.4 MB and ~1.1 ms of ~5.5 ms per thread), else
  // packed now into the calling thread's scratch.
  const float* weight_panels() const {
    if (p.packed_weight) {
      const int64_t want = p.groups * ((cout_g + Nb - 1) / Nb) * K * Nb;
      TORCH_CHECK(p.packed_weight_numel == want, "conv2d_fused: packed_weight must be conv2d_pack_weight(weight, ",
                  p.groups, ") of this weight: expected ", want, " values, got ", p.packed_weight_numel);
      return p.packed_weight;
    }
    float* wc = scratch(kPanels, p.groups * ((cout_g + Nb - 1) / Nb) * K * Nb);
    pack_weight_panels(w, p.groups, cout_g, cin_g, p.kernel_h * p.kernel_w, wc);
    return wc;
  }

  // Epilogue of an nhwc tile ct [M pixels, nbc channels] (row stride ldc) of image n: pixels pix0 .. pix0 + M,
  // channels c0 .. c0 + nbc. A channels-last output takes it row by row (each row is nbc contiguous outputs);
  // otherwise the tile is transposed into acc [nbc, M] and stored channel by channel.
  template <Activation A>
  void epilogue_tile(float* ct, int64_t M, int64_t nbc, int64_t ldc, int64_t c0, int64_t n, int64_t pix0, float* acc,
                     float* rbuf) const {
    const Vec<float> slope(p.slope);
    if (p.out_stride_p == 1 && !p.residual && p.input_dtype == DType::kFloat32) {
      // fp32 NCHW output: the epilogue along the tile's rows, then the tile transposed straight into out.
      for (int64_t i = 0; i < M; ++i) {
        float* v = ct + i * ldc;
        for (int64_t j = 0; j < nbc; j += Vec<float>::size()) {
          const int64_t k = std::min<int64_t>(Vec<float>::size(), nbc - j);
          const Vec<float> z =
              at::vec::fmadd(vload(v + j, k), vload(s.data() + c0 + j, k), vload(t.data() + c0 + j, k));
          vstore(act_fwd<A>(z, slope), v + j, k);
        }
      }
      float* out = static_cast<float*>(p.out) + n * p.out_stride_n + c0 * p.out_stride_c + pix0;
      transpose(ct, ldc, out, p.out_stride_c, M, nbc);
      return;
    }
    if (p.out_stride_c == 1 && (!p.residual || p.res_stride_c == 1)) {
      for (int64_t i = 0; i < M; ++i) {
        float* v = ct + i * ldc;
        if (p.residual) {
          load_row(p.residual, p.input_dtype, n * p.res_stride_n + c0 + (pix0 + i) * p.res_stride_p, 1, nbc, rbuf);
        }
        for (int64_t j = 0; j < nbc; j += Vec<float>::size()) {
          const int64_t k = std::min<int64_t>(Vec<float>::size(), nbc - j);
          Vec<float> z = at::vec::fmadd(vload(v + j, k), vload(s.data() + c0 + j, k), vload(t.data() + c0 + j, k));
          if (p.residual) z = z + vload(rbuf + j, k);
          vstore(act_fwd<A>(z, slope), v + j, k);
        }
        store_row(v, nbc, p.out, p.input_dtype, n * p.out_stride_n + c0 + (pix0 + i) * p.out_stride_p, 1);
      }
      return;
    }
    transpose(ct, ldc, acc, M, M, nbc);
    for (int64_t o = 0; o < nbc; ++o) epilogue_run<A>(acc + o * M, M, c0 + o, n, pix0, rbuf);
  }

  // The fp32 forward on channels-last tiles: C[pixels, Cout] = X^T W^T, against the weights packed into
  // [K, Nb] column-block panels (weight_panels). Each image is packed channels-last and zero-padded
  // (pack_image) by the first thread that needs it, right before its items, so that it is in that core's L2
  // (0.9 MB at 56x56x64; see packed_images). Two schedules, both image-major and deterministic (each output
  // element is computed by one thread in a fixed order):
  //  - rows (OW >= 12): the input pixels one kernel tap reads for one output row are a row-major [OW, Cin_g]
  //    matrix of the packed image (row stride sw * Cin: no copy, no wasted columns); against the tap's
  //    [Cin_g, Nb] panel rows that is one brgemm call (M = OW pixels, N = Nb channels) accumulating into an
  //    [OW, Nb] tile in L1, and the epilogue takes the tile while it is hot.
  //  - gathered (OW < 12, the 7x7 stage, where M = OW would be too short for brgemm): see forward_gathered.
  template <Activation A>
  void forward_nhwc() const {
    const float* wc = weight_panels();
    if (p.out_w < 12) return forward_gathered<A>(wc);
    const int64_t C = p.in_channels, OH = p.out_h, OW = p.out_w, KW = p.kernel_w, taps = p.kernel_h * KW;
    const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
    const int64_t ncb = (cout_g + Nb - 1) / Nb;
    // Undilated along w with one group, the KW taps of one kernel row read KW * Cin consecutive floats of xi
    // per output pixel: a [OW, KW * Cin] matrix with overlapping rows (row stride sw * Cin) against the
    // [KW * Cin, Nb] rows of the panel, so one brgemm call per kernel row (K = 192 instead of 3 calls of 64 at
    // 56x56x64).
    const bool merge_kw = dw == 1 && p.groups == 1;
    // Row block: about 64 pixels, a 16 KB tile at Nb = 64.
    const int64_t R = std::clamp<int64_t>(64 / OW, 1, OH), nrb = (OH + R - 1) / R, mt = R * OW;
    const int64_t per_image = p.groups * ncb * nrb;
    PackedImages pk = packed_images();
    at::parallel_for(0, p.batch * per_image, 1, [&](int64_t begin, int64_t end) {
      float* const ct = scratch(kTile, 2 * mt * Nb + std::max(mt, Nb));
      float *const acc = ct + mt * Nb, *const rbuf = acc + mt * Nb;
      for (int64_t item = begin; item < end; ++item) {
        // (n, g, j, rb): a weight panel serves all row blocks of an image in a row.
        const int64_t n = item / per_image, gj = item % per_image / nrb, rb = item % nrb;
        const int64_t g = gj / ncb, j = gj % ncb;
        const float* xi = image(pk, n);
        const int64_t oh0 = rb * R, nr = std::min(R, OH - oh0), nbc = std::min(Nb, cout_g - j * Nb);
        const float* B = wc + gj * K * Nb;
        const float* xg = xi + g * cin_g;
        for (int64_t r = 0; r < nr; ++r) {
          float* cr = ct + r * OW * Nb;
          if (merge_kw) {
            for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
              const float* a = xg + ((oh0 + r) * sh + kh * dh) * Wx * C;
              at::native::cpublas::brgemm(OW, nbc, KW * C, sw * C, Nb, Nb, kh > 0, a, B + kh * KW * C * Nb, cr,
                                          /*is_vnni=*/false);
            }
            continue;
          }
          for (int64_t tap = 0; tap < taps; ++tap) {
            const int64_t kh = tap / KW, kw = tap % KW;
            const float* a = xg + (((oh0 + r) * sh + kh * dh) * Wx + kw * dw) * C;
            at::native::cpublas::brgemm(OW, nbc, cin_g, sw * C, Nb, Nb, tap > 0, a, B + tap * cin_g * Nb, cr,
                                        /*is_vnni=*/false);
          }
        }
        epilogue_tile<A>(ct, nr * OW, nbc, Nb, g * cout_g + j * Nb, n, oh0 * OW, acc, rbuf);
      }
      at::native::cpublas::brgemm_release(/*is_vnni=*/false);
    });
  }

  // Narrow outputs (OW < 12): the pixels of a group of images (4 at 7x7, M = 196) run as one GEMM against all
  // the panels, K in chunks of 512 outermost: per chunk, col [M, 512] is gathered from the group's packed
  // images (memcpy of runs of channels) and stays in L2 while every panel's [512, Nb] chunk streams past once
  // into the [M, Cout_g] accumulator. (Image by image with the panels outer, 7x7x512 3x3 streamed its 9.4 MB
  // of weights from L3 once per image, 75 MB a call, at ~190 GFLOP/s; the whole [M, K] col gathered first,
  // 3.6 MB, went to L3 and back.) A group takes up to ~200 pixels, fewer when that would leave a thread
  // without one; tall images go in blocks of rows.
  template <Activation A>
  void forward_gathered(const float* wc) const {
    const int64_t C = p.in_channels, OH = p.out_h, OW = p.out_w, KW = p.kernel_w, plane = Hx * Wx * C;
    const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
    const int64_t ncb = (cout_g + Nb - 1) / Nb, ldc = ncb * Nb, threads = at::get_num_threads();
    constexpr int64_t kMaxPix = 200, kChunk = 512;
    const int64_t R = std::clamp<int64_t>(kMaxPix / OW, 1, OH), nrb = (OH + R - 1) / R;
    const int64_t units = p.batch * nrb;  // (n, rb) pairs
    const int64_t per_group =
        std::max<int64_t>(1, std::min<int64_t>(nrb == 1 ? kMaxPix / ohw : 1, (units + threads - 1) / threads));
    const int64_t ngroups = (units + per_group - 1) / per_group, mmax = per_group * R * OW;
    // A 1x1 at stride 1 reads each output pixel's own input pixel: a group's pixels are consecutive rows of
    // the packed images (row stride C), brgemm's A operand as they are. (7x7x512 1x1: the copy into col was
    // 0.8 MB per call.)
    const bool in_place = p.kernel_h * KW == 1 && sh == 1 && sw == 1;
    PackedImages pk = packed_images();
    at::parallel_for(0, p.groups * ngroups, 1, [&](int64_t begin, int64_t end) {
      float* const col = scratch(kCol, mmax * std::min(kChunk, K));
      float* const ct = scratch(kTile, mmax * ldc + mmax * Nb + std::max(mmax, Nb));
      float *const acc = ct + mmax * ldc, *const rbuf = acc + mmax * Nb;
      std::vector<const float*> src(mmax);  // per pixel of the group: its input pixel at tap 0 in xs
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / ngroups, u0 = item % ngroups * per_group, u1 = std::min(units, u0 + per_group);
        const int64_t n0 = u0 / nrb, n1 = (u1 - 1) / nrb + 1;
        for (int64_t n = n0; n < n1; ++n) image(pk, n);
        int64_t M = 0;
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / nrb, oh0 = u % nrb * R, nr = std::min(R, OH - oh0);
          const float* xn = pk.data.get() + n * plane + g * cin_g;
          for (int64_t oh = oh0; oh < oh0 + nr; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) src[M++] = xn + (oh * sh * Wx + ow * sw) * C;
        }
        const float* Bg = wc + g * ncb * K * Nb;
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
          const int64_t kc = std::min(kChunk, K - k0);
          if (in_place) {  // pixel m of the group is row m of the packed images: A is read there, no col
            for (int64_t j = 0; j < ncb; ++j)
              at::native::cpublas::brgemm(M, std::min(Nb, cout_g - j * Nb), kc, C, Nb, ldc, k0 > 0, src[0] + k0,
                                          Bg + (j * K + k0) * Nb, ct + j * Nb, /*is_vnni=*/false);
            continue;
          }
          // col[m, k - k0] for k = tap * Cin_g + ci in [k0, k0 + kc): runs of channels of one tap.
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t k = k0; k < k0 + kc;) {
              const int64_t tap = k / cin_g, ci = k % cin_g, len = std::min(cin_g - ci, k0 + kc - k);
              const float* x_tap = src[m] + ((tap / KW) * dh * Wx + (tap % KW) * dw) * C + ci;
              std::memcpy(col + m * kc + (k - k0), x_tap, len * sizeof(float));
              k += len;
            }
          }
          for (int64_t j = 0; j < ncb; ++j)
            at::native::cpublas::brgemm(M, std::min(Nb, cout_g - j * Nb), kc, kc, Nb, ldc, k0 > 0, col,
                                        Bg + (j * K + k0) * Nb, ct + j * Nb, /*is_vnni=*/false);
        }
        int64_t m = 0;
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / nrb, oh0 = u % nrb * R, cnt = std::min(R, OH - oh0) * OW;
          for (int64_t j = 0; j < ncb; ++j)
            epilogue_tile<A>(ct + m * ldc + j * Nb, cnt, std::min(Nb, cout_g - j * Nb), ldc,
                             g * cout_g + j * Nb, n, oh0 * OW, acc, rbuf);
          m += cnt;
        }
      }
      at::native::cpublas::brgemm_release(/*is_vnni=*/false);
    });
  }
#endif

  // f(j, n, pix, cnt): the runs of pixels [m0, m0 + n_pix) inside one image.
  template <typename F>
  void for_images(int64_t m0, int64_t n_pix, F&& f) const {
    int64_t j = 0;
    while (j < n_pix) {
      const int64_t m = m0 + j, n = m / ohw, pix = m % ohw, cnt = std::min(ohw - pix, n_pix - j);
      f(j, n, pix, cnt);
      j += cnt;
    }
  }

  template <Activation A>
  void backward(const Conv2dBwdParams& b) const {
    const Vec<T> slope(T(p.slope));
    const int64_t nthreads = at::get_num_threads(), C = p.out_channels;
    // Per-thread partial sums of dW, dscale, dshift; each is reduced in thread order below.
    // dW is accumulated transposed, dW_g^T [K, Cout_g] = sum col @ gz^T, so that neither GEMM needs a
    // transposed copy of a K-sized operand per tile (the small gz is transposed instead).
    std::vector<std::vector<T>> dw_part(nthreads), ds_part(nthreads), dt_part(nthreads);
    std::vector<T> wT(p.groups * K * cout_g);  // [G][K][Cout_g]
    for (int64_t g = 0; g < p.groups; ++g)
      for (int64_t oc = 0; oc < cout_g; ++oc)
        for (int64_t k = 0; k < K; ++k) wT[(g * K + k) * cout_g + oc] = w[(g * cout_g + oc) * K + k];
    // dx accumulates in math type, NCHW; fp32/fp64 NCHW-contiguous dx is written in place.
    const bool dx_direct = (std::is_same_v<T, float> ? p.input_dtype == DType::kFloat32
                                                     : p.input_dtype == DType::kFloat64) &&
                           b.dx_stride[3] == 1 && b.dx_stride[2] == p.in_w && b.dx_stride[1] == p.in_h * p.in_w &&
                           b.dx_stride[0] == p.in_channels * p.in_h * p.in_w;
    const int64_t dx_numel = p.batch * p.in_channels * p.in_h * p.in_w;
    std::vector<T> dx_own(dx_direct ? 0 : dx_numel);
    T* dx = dx_direct ? static_cast<T*>(b.dx) : dx_own.data();
    at::parallel_for(0, dx_numel, at::internal::GRAIN_SIZE, [&](int64_t lo, int64_t hi) {
      std::fill(dx + lo, dx + hi, T(0));
    });
    for (int phase = 0; phase < 2; ++phase) {
      const int64_t count = (ntiles - phase + 1) / 2;
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        const int tid = at::get_thread_num();
        auto& dw = dw_part[tid];
        auto& ds = ds_part[tid];
        auto& dt = dt_part[tid];
        if (dw.empty()) dw.assign(C * K, T(0)), ds.assign(C, T(0)), dt.assign(C, T(0));
        std::vector<T> colbuf(K * mt), acc(cout_g * mt), gzT(cout_g * mt), dcol(K * mt), zbuf(mt);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t tile = 2 * i + phase, m0 = tile * mt, n_pix = std::min(mt, M - m0);
          for (int64_t g = 0; g < p.groups; ++g) {
            const T* col;
            int64_t ldcol;
            tile_gemm(g, m0, n_pix, colbuf.data(), acc.data(), col, ldcol);
            // Prologue of the gradient GEMMs: acc -> gz = dout * act'(z) * scale, row by row.
            for (int64_t oc = 0; oc < cout_g; ++oc) {
              const int64_t c = g * cout_g + oc;
              T* row = acc.data() + oc * n_pix;
              if (p.residual) {
                for_images(m0, n_pix, [&](int64_t j, int64_t n, int64_t pix, int64_t cnt) {
                  load_row(p.residual, p.input_dtype, n * p.res_stride_n + c * p.res_stride_c + pix * p.res_stride_p,
                       p.res_stride_p, cnt, zbuf.data() + j);
                });
              }
              T* gbuf = dcol.data();  // dcol is free until the second GEMM: it holds dout's row meanwhile
              for_images(m0, n_pix, [&](int64_t j, int64_t n, int64_t pix, int64_t cnt) {
                load_row(b.dout, p.input_dtype, n * b.dout_stride_n + c * b.dout_stride_c + pix * b.dout_stride_p,
                     b.dout_stride_p, cnt, gbuf + j);
              });
              const Vec<T> sc(s[c]), sh(t[c]);
              Vec<T> sum_g(T(0)), sum_ga(T(0));
              for (int64_t j = 0; j < n_pix; j += Vec<T>::size()) {
                const int64_t cnt = std::min<int64_t>(Vec<T>::size(), n_pix - j);
                const Vec<T> a = vload(row + j, cnt);
                Vec<T> z = at::vec::fmadd(a, sc, sh);
                if (p.residual) z = z + vload(zbuf.data() + j, cnt);
                const Vec<T> gr = vload(gbuf + j, cnt) * act_grad<A>(z, slope);  // lanes past cnt load as 0
                sum_g = sum_g + gr;
                sum_ga = at::vec::fmadd(gr, a, sum_ga);
                vstore(gr, gbuf + j, cnt);
                vstore(gr * sc, row + j, cnt);
              }
              dt[c] += hsum(sum_g), ds[c] += hsum(sum_ga);
              if (b.dresidual) {
                for_images(m0, n_pix, [&](int64_t j, int64_t n, int64_t pix, int64_t cnt) {
                  store_row(gbuf + j, cnt, b.dresidual, p.input_dtype,
                        n * b.dres_stride_n + c * b.dres_stride_c + pix * b.dres_stride_p, b.dres_stride_p);
                });
              }
            }
            for (int64_t oc = 0; oc < cout_g; ++oc) {
              const T* row = acc.data() + oc * n_pix;
              for (int64_t j = 0; j < n_pix; ++j) gzT[j * cout_g + oc] = row[j];
            }
            // dW_g^T[K, Cout_g] += col[K, n_pix] @ gz^T[n_pix, Cout_g]
            rnn::cpu::gemm<T>(false, false, K, cout_g, n_pix, col, ldcol, gzT.data(), cout_g, true,
                              dw.data() + g * K * cout_g, cout_g, /*parallel=*/false);
            // dcol[K, n_pix] = W_g^T[K, Cout_g] @ gz[Cout_g, n_pix], then scattered into dx.
            rnn::cpu::gemm<T>(false, false, K, n_pix, cout_g, wT.data() + g * K * cout_g, cout_g, acc.data(), n_pix,
                              false, dcol.data(), n_pix, /*parallel=*/false);
            col2im(g, m0, n_pix, dcol.data(), dx);
          }
        }
      });
    }
    T* dweight = static_cast<T*>(b.dweight);
    T* dscale = static_cast<T*>(b.dscale);
    T* dshift = static_cast<T*>(b.dshift);
    std::fill(dweight, dweight + C * K, T(0));
    std::fill(dscale, dscale + C, T(0));
    std::fill(dshift, dshift + C, T(0));
    for (int64_t tid = 0; tid < nthreads; ++tid) {
      if (dw_part[tid].empty()) continue;
      const T* part = dw_part[tid].data();  // [G][K][Cout_g]
      for (int64_t g = 0; g < p.groups; ++g)
        for (int64_t oc = 0; oc < cout_g; ++oc)
          for (int64_t k = 0; k < K; ++k) dweight[(g * cout_g + oc) * K + k] += part[(g * K + k) * cout_g + oc];
      for (int64_t c = 0; c < C; ++c) dscale[c] += ds_part[tid][c], dshift[c] += dt_part[tid][c];
    }
    if (!dx_direct) {
      const int64_t rows = p.batch * p.in_channels * p.in_h;
      at::parallel_for(0, rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(p.in_w, 1)),
                       [&](int64_t lo, int64_t hi) {
                         for (int64_t r = lo; r < hi; ++r) {
                           const int64_t ih = r % p.in_h, c = (r / p.in_h) % p.in_channels,
                                         n = r / (p.in_h * p.in_channels);
                           store_row(dx + r * p.in_w, p.in_w, b.dx, p.input_dtype,
                                 n * b.dx_stride[0] + c * b.dx_stride[1] + ih * b.dx_stride[2], b.dx_stride[3]);
                         }
                       });
    }
  }
};

template <typename T>
void fwd_impl(const Conv2dParams& p) {
  const Conv<T> conv(p, 1);
  act_switch(p.act, [&](auto a) { conv.template forward<decltype(a)::value>(); });
}

template <typename T>
void bwd_impl(const Conv2dBwdParams& p) {
  // Tiles span at least this many output rows, so that tiles two apart scatter into disjoint dx rows.
  const int64_t rows = (p.kernel_h - 1) * p.dilation_h / p.stride_h + 1;
  const Conv<T> conv(p, rows);
  act_switch(p.act, [&](auto a) { conv.template backward<decltype(a)::value>(p); });
}

// Math type: fp64 for fp64 inputs, fp32 otherwise.
void fwd_cpu(const Conv2dParams& p) {
  if (p.input_dtype == DType::kFloat64) return fwd_impl<double>(p);
  fwd_impl<float>(p);
}
void bwd_cpu(const Conv2dBwdParams& p) {
  if (p.input_dtype == DType::kFloat64) return bwd_impl<double>(p);
  bwd_impl<float>(p);
}

// conv2d_pack_weight (schema in csrc/ops.cpp): weight [Cout, Cin_g, KH, KW] -> the 1-D fp32 panels
// (pack_weight_panels), empty where the forward takes no panels.
at::Tensor conv2d_pack_weight(const at::Tensor& weight, int64_t groups) {
  const char* op = "conv2d_pack_weight";
  TORCH_CHECK(weight.dim() == 4, op, ": weight must have shape (C_out, C_in / groups, kH, kW), got ",
              shape_str(weight.sizes()));
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": groups (", groups,
              ") must be positive and divide the output channels (weight.shape[0] = ", weight.size(0), ")");
  const auto t = weight.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": weight must be float32, float64, bfloat16 or float16, got ", t);
  const int64_t cout_g = weight.size(0) / groups, cin_g = weight.size(1), taps = weight.size(2) * weight.size(3);
  const auto options = weight.options().dtype(at::kFloat);
#if FASTDL_RNN_BRGEMM
  // As Conv's choice of the channels-last forward: fp32 math, >= 16 channels per group in and out.
  if (t != at::kDouble && cin_g >= 16 && cout_g >= 16) {
    const at::Tensor w = weight.to(at::kFloat).contiguous();
    const int64_t Nb = panel_cols(cout_g);
    at::Tensor packed = at::empty({groups * ((cout_g + Nb - 1) / Nb) * cin_g * taps * Nb}, options);
    pack_weight_panels(w.data_ptr<float>(), groups, cout_g, cin_g, taps, packed.data_ptr<float>());
    return packed;
  }
#endif
  return at::empty({0}, options);
}

}  // namespace
}  // namespace fastdl::conv

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("conv2d_fused", &fastdl::conv::conv2d_fused<fastdl::conv::fwd_cpu>);
  m.impl("conv2d_fused_backward", &fastdl::conv::conv2d_fused_backward<fastdl::conv::bwd_cpu>);
  m.impl("conv2d_pack_weight", &fastdl::conv::conv2d_pack_weight);
}
