// CUDA fused conv2d, forward: implicit GEMM with the epilogue (scale, shift + bias, residual, activation)
// applied to the tile before it leaves the block. Torch-free: params struct in, raw pointers, a launch
// function taking a cudaStream_t. The backward (conv_bwd_kernel.cuh) reuses the same main loop.
//
// The main loop, implicit_gemm_tile, is generic: C[m, n] = sum_k A(m, k) * B(k, n) over one 64 x 64 tile
// of C and a k range, with A and B produced by gather functors (so the GEMM operands are never
// materialised: im2col, zero padding and, in the backward, the activation's derivative happen in the
// gather) and C handed element by element to an epilogue functor. Per k step of 32:
//   * each thread gathers 16 consecutive k of one A row and of one B row (row state computed once per
//     tile, see the Row types) into registers one step ahead, converts them to T and stores them to shared
//     memory with 16-byte stores, both operands k-contiguous: sA[64 rows][32 k], sB[64 cols][32 k] (row
//     pitch 40 elements: 80 B, 16-byte aligned for ldmatrix). When x is channels_last with Cin_g a
//     multiple of 16 bytes (every ResNet conv but the stem), the forward's A instead arrives by 16-byte
//     cp.async (zero-fill in the padding) into two shared stages, the next step's copies in flight during
//     this step's MMAs;
//   * fp16 / bf16: 4 warps, each a 32 x 32 sub-tile = 2 x 4 mma.sync m16n8k16 tiles with fp32
//     accumulators, operands loaded with ldmatrix.x4 (fragment layouts in flash_attn/flash_ptx.cuh);
//     fp32: each of the 128 threads accumulates a 4 x 8 sub-tile with FMAs;
//   * the fp32 tile then goes through shared memory to the epilogue, threads walking n fastest, so an
//     NHWC output (channels_last) is written coalesced (an NCHW one is not).
// Shared memory is reached only through flash_ptx.cuh (ldmatrix, mma, st_shared_16) and common/cuda_simt.cuh
// (sld / sst, the dynamic shared memory, the launch), whose twins in tests/ops/cuda_emu/include let the CPU
// emulator run this very source and check every shared access for races and bounds (test_conv_emu.py);
// global memory is read and written with plain accesses, which the emulator does not check (its cp.async
// reads it does check, against x). Not done yet: cp.async for B (the weight's k order (kh, kw, ci) is not
// its memory order; it would need a permuted copy) and for the backward's gathers (which compute), more
// than two stages, swizzled shared memory, incremental (tap, ci) stepping instead of a div / mod per
// element. It has run on the emulator, not on a GPU (none was available), so nothing about its speed is
// known; compiled for sm_80 / sm_90.
//
// Forward GEMM per group g (blockIdx.z): rows m = output pixels (n, oh, ow) (M = N * OH * OW), columns =
// the group's output channels, k = (kh, kw, ci) (K = KH * KW * Cin_g, ci fastest, so that a
// channels_last x is read along its contiguous channels).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_simt.cuh"
#include "common/cuda_utils.cuh"
#include "conv/conv_launch.h"
#include "conv/conv_params.h"
#include "flash_attn/flash_ptx.cuh"

namespace fastdl::conv {
namespace detail {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kLd = kBK + 8;   // shared row pitch of sA / sB in elements (80 B for 16-bit types)
constexpr int kLdc = kBN + 4;  // fp32 C tile pitch

// kAsyncA: A arrives by cp.async into two stages of (sA, sB) (see implicit_gemm_tile), else one stage.
template <typename T, bool kAsyncA = false>
constexpr int gemm_smem_bytes() {
  const int ab = (kAsyncA ? 2 : 1) * (kBM + kBN) * kLd * static_cast<int>(sizeof(T));
  const int c = kBM * kLdc * static_cast<int>(sizeof(float));
  return ab > c ? ab : c;
}

__device__ __forceinline__ float activate(Activation a, float z, float slope) {
  switch (a) {
    case Activation::kRelu: return fmaxf(z, 0.f);
    case Activation::kLeakyRelu: return z > 0.f ? z : z * slope;
    case Activation::kSilu: return z / (1.f + expf(-z));
    case Activation::kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case Activation::kSigmoid: return 1.f / (1.f + expf(-z));
    case Activation::kTanh: return tanhf(z);
    default: return z;
  }
}

// d act / dz from the pre-activation z. relu and leaky_relu take the z <= 0 branch at 0, as torch's
// threshold / leaky backward (and conv_cpu.cpp) do.
__device__ __forceinline__ float activate_grad(Activation a, float z, float slope) {
  switch (a) {
    case Activation::kRelu: return z > 0.f ? 1.f : 0.f;
    case Activation::kLeakyRelu: return z > 0.f ? 1.f : slope;
    case Activation::kSilu: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
    case Activation::kGelu:  // Phi(z) + z * phi(z)
      return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * expf(-0.5f * z * z) * 0.3989422804014327f;
    case Activation::kSigmoid: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f - s);
    }
    case Activation::kTanh: {
      const float t = tanhf(z);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

// 16 values of one tile row, converted to T, as 16-byte shared stores (dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_row16(T* dst, const float (&v)[16]) {
  if constexpr (std::is_same_v<T, float>) {
    for (int q = 0; q < 4; ++q) {
      uint4 u;
      memcpy(&u, &v[4 * q], sizeof(u));
      fastdl::flash_attn::st_shared_16(dst + 4 * q, u);
    }
  } else {
    for (int q = 0; q < 2; ++q) {
      const float* w = &v[8 * q];
      const uint4 u = make_uint4(fastdl::flash_attn::pack2<T>(w[0], w[1]), fastdl::flash_attn::pack2<T>(w[2], w[3]),
                                 fastdl::flash_attn::pack2<T>(w[4], w[5]), fastdl::flash_attn::pack2<T>(w[6], w[7]));
      fastdl::flash_attn::st_shared_16(dst + 8 * q, u);
    }
  }
}

// ---- the generic main loop ---------------------------------------------------------------------------
//
// GA / GB: `Row row(int64_t r) const` (state of tile row r, r may be past the end: the functor then
// returns a row whose loads are 0) and `float load(const Row&, int64_t k) const` (k in [k_begin, k_end)).
// Epi: `void operator()(int64_t m, int64_t n, float c) const`, called once for each m < M, n < N.
//
// kAsyncA: A is instead copied as it is stored (T, no conversion) with 16-byte cp.async, GA providing
// `const T* chunk(const Row&, int64_t k, bool& in) const` for the 16 / sizeof(T) elements from k (in: false
// on entry past k_end; set false where the chunk is zero, e.g. padding, and then a valid dummy address is
// returned). The A tile then has two shared stages: step s + 1's copies fly while step s is multiplied
// (B keeps the register prefetch). K and k_begin must be multiples of the chunk.
template <typename T, bool kAsyncA = false, typename GA, typename GB, typename Epi>
__device__ __forceinline__ void implicit_gemm_tile(const GA& ga, const GB& gb, const Epi& epi, int64_t M, int64_t N,
                                                   int64_t m0, int64_t n0, int64_t k_begin, int64_t k_end) {
  using fastdl::cuda::sld;
  using fastdl::cuda::sst;
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(kBM == 64 && kBN == 64 && kBK == 32 && kThreads == 128, "loader and warp layout below");
  unsigned char* smem = fastdl::cuda::dynamic_smem();
  T* const stages = reinterpret_cast<T*>(smem);  // kAsyncA ? 2 : 1 times { sA [kBM][kLd], sB [kBN][kLd] }
  constexpr int kStage = (kBM + kBN) * kLd;
  float* sc = reinterpret_cast<float*>(smem);  // [kBM][kLdc], after the main loop
  const int tid = static_cast<int>(threadIdx.x);
  // Loader: thread owns row lr of both tiles and k offsets lk .. lk + 15 of the step.
  const int lr = tid >> 1, lk = (tid & 1) * 16;
  const auto arow = ga.row(m0 + lr);
  const auto brow = gb.row(n0 + lr);

  const int lane = tid & 31, warp = tid >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // tensor cores: the warp's 32 x 32 sub-tile
  const int ty = tid >> 3, tx = tid & 7;                  // FMA: rows ty*4 .. +4, columns tx*8 .. +8
  float acc[kTensorCores ? 2 : 4][kTensorCores ? 4 : 8][kTensorCores ? 4 : 1];
  for (auto& a : acc)
    for (auto& b : a)
      for (float& c : b) c = 0.f;

  // Register prefetch: the next step's gathers are issued before this step's MMAs, so that their
  // global-memory latency overlaps the math (the shared tiles themselves are single-buffered).
  float ra[16], rb[16];
  auto gather = [&](int64_t k0) {
    for (int e = 0; e < 16; ++e) {
      const int64_t k = k0 + lk + e;
      const bool in = k < k_end;
      if constexpr (!kAsyncA) ra[e] = in ? ga.load(arow, k) : 0.f;
      rb[e] = in ? gb.load(brow, k) : 0.f;
    }
  };
  auto copy_a = [&](T* sa, int64_t k0) {  // kAsyncA only
    if constexpr (kAsyncA) {
      for (int e = 0; e < 16; e += kVec) {
        const int64_t k = k0 + lk + e;
        bool in = k < k_end;
        const T* src = ga.chunk(arow, k, in);
        fastdl::flash_attn::cp_async_16(&sa[lr * kLd + lk + e], src, in);
      }
    }
  };
  if (k_begin < k_end) {
    gather(k_begin);
    copy_a(stages, k_begin);
  }
  if constexpr (kAsyncA) fastdl::flash_attn::cp_async_commit();
  int stage = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    T* const sa = stages + stage * kStage;
    T* const sb = sa + kBM * kLd;
    if constexpr (!kAsyncA) store_row16(&sa[lr * kLd + lk], ra);
    store_row16(&sb[lr * kLd + lk], rb);
    if (k0 + kBK < k_end) {
      gather(k0 + kBK);
      // The other stage was last read by the previous step's MMAs, which the barrier that ended it orders.
      copy_a(stages + (stage ^ 1) * kStage, k0 + kBK);
    }
    if constexpr (kAsyncA) {
      fastdl::flash_attn::cp_async_commit();  // possibly empty: keeps "this step's group" the second newest
      fastdl::flash_attn::cp_async_wait<1>();
      stage ^= 1;
    }
    __syncthreads();
    if constexpr (kTensorCores) {
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[2][4], bf[4][2];
        for (int i = 0; i < 2; ++i)
          fastdl::flash_attn::ldmatrix_x4(af[i], &sa[(wm + 16 * i + (lane & 15)) * kLd + kk + (lane >> 4) * 8]);
        for (int j = 0; j < 4; j += 2) {
          uint32_t r[4];
          fastdl::flash_attn::ldmatrix_x4(
              r, &sb[(wn + 8 * j + (lane >> 4) * 8 + (lane & 7)) * kLd + kk + ((lane >> 3) & 1) * 8]);
          bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
        }
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 4; ++j) fastdl::flash_attn::mma_16816<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
      }
    } else {
      for (int kk = 0; kk < kBK; ++kk) {
        float a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = fastdl::cuda::to_math(sld(&sa[(ty * 4 + i) * kLd + kk]));
        for (int j = 0; j < 8; ++j) b[j] = fastdl::cuda::to_math(sld(&sb[(tx * 8 + j) * kLd + kk]));
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) acc[i][j][0] = fmaf(a[i], b[j], acc[i][j][0]);
      }
    }
    __syncthreads();
  }

  // C fragment layout (flash_ptx.cuh): c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
  if constexpr (kTensorCores) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        const int r = wm + 16 * i + g, c = wn + 8 * j + 2 * t;
        sst(&sc[r * kLdc + c], acc[i][j][0]);
        sst(&sc[r * kLdc + c + 1], acc[i][j][1]);
        sst(&sc[(r + 8) * kLdc + c], acc[i][j][2]);
        sst(&sc[(r + 8) * kLdc + c + 1], acc[i][j][3]);
      }
  } else {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) sst(&sc[(ty * 4 + i) * kLdc + tx * 8 + j], acc[i][j][0]);
  }
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) epi(m, n, sld(&sc[r * kLdc + c]));
  }
}

// ---- gathers shared by forward and backward ----------------------------------------------------------

// x as the forward's A: row = output pixel m = (n, oh, ow), k = (kh, kw, ci), ci fastest. Zero outside
// the image (the padding).
template <typename T>
struct XByPixel {
  const T* x;  // x at (0, g * Cin_g, 0, 0)
  int64_t s[4], M, ohw, out_w, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, in_h, in_w;
  int cin_g, kw;
  struct Row {
    const T* xn;
    int64_t ih0, iw0;
    bool valid;
  };
  __device__ __forceinline__ XByPixel(const Conv2dParams& p, int g) {
    x = static_cast<const T*>(p.x);
    for (int i = 0; i < 4; ++i) s[i] = p.x_stride[i];
    cin_g = static_cast<int>(p.in_channels / p.groups), kw = static_cast<int>(p.kernel_w);
    x += static_cast<int64_t>(g) * cin_g * s[1];
    ohw = p.out_h * p.out_w, M = p.batch * ohw, out_w = p.out_w;
    stride_h = p.stride_h, stride_w = p.stride_w, pad_top = p.pad_top, pad_left = p.pad_left;
    dil_h = p.dilation_h, dil_w = p.dilation_w, in_h = p.in_h, in_w = p.in_w;
  }
  __device__ __forceinline__ Row row(int64_t m) const {
    if (m >= M) return {x, 0, 0, false};
    const int64_t n = m / ohw, pix = m % ohw;
    return {x + n * s[0], (pix / out_w) * stride_h - pad_top, (pix % out_w) * stride_w - pad_left, true};
  }
  __device__ __forceinline__ float load(const Row& r, int64_t k) const {
    if (!r.valid) return 0.f;
    const int kk = static_cast<int>(k);  // < KH * KW * Cin_g < 2^31 (conv_cuda.cpp checks): 32-bit div / mod
    const int ci = kk % cin_g, tap = kk / cin_g;
    const int64_t ih = r.ih0 + (tap / kw) * dil_h, iw = r.iw0 + (tap % kw) * dil_w;
    if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w) return 0.f;
    return fastdl::cuda::to_math(r.xn[ci * s[1] + ih * s[2] + iw * s[3]]);
  }
  // For kAsyncA, when x is vectorizable (below): the chunk of ci .. ci + 16 / sizeof(T) - 1 at k's tap.
  __device__ __forceinline__ const T* chunk(const Row& r, int64_t k, bool& in) const {
    const int kk = static_cast<int>(k);
    const int ci = kk % cin_g, tap = kk / cin_g;
    const int64_t ih = r.ih0 + (tap / kw) * dil_h, iw = r.iw0 + (tap % kw) * dil_w;
    in = in && r.valid && ih >= 0 && ih < in_h && iw >= 0 && iw < in_w;
    return in ? r.xn + ci + ih * s[2] + iw * s[3] : x;
  }
};

// Whether XByPixel may hand out 16-byte chunks: x channels_last-like (channels contiguous), every chunk
// start (n, h, w strides, group offsets, Cin_g) a multiple of 16 bytes. Host side, from the params.
template <typename T>
inline bool x_chunks_aligned(const Conv2dParams& p) {
  constexpr int64_t v = 16 / static_cast<int64_t>(sizeof(T));
  return p.x_stride[1] == 1 && (p.in_channels / p.groups) % v == 0 && p.x_stride[0] % v == 0 &&
         p.x_stride[2] % v == 0 && p.x_stride[3] % v == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

// The weight [Cout, Cin_g, KH, KW] (contiguous) with rows = the group's channels along `rows_are_out`
// (forward: row = co, k = (kh, kw, ci); backward data: row = ci, k = (kh, kw, co)).
template <typename T, bool kRowsAreOut>
struct WeightGather {
  const T* w;  // the group's first output channel
  int64_t rows;
  int inner, taps, kdim;  // inner: the channel count fastest in k; kdim = Cin_g * KH * KW (a weight row)
  struct Row {
    int64_t r;
    bool valid;
  };
  __device__ __forceinline__ WeightGather(const Conv2dParams& p, int g) {
    const int64_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
    taps = static_cast<int>(p.kernel_h * p.kernel_w), kdim = static_cast<int>(cin_g * taps);
    w = static_cast<const T*>(p.weight) + static_cast<int64_t>(g) * cout_g * kdim;
    rows = kRowsAreOut ? cout_g : cin_g;
    inner = static_cast<int>(kRowsAreOut ? cin_g : cout_g);
  }
  __device__ __forceinline__ Row row(int64_t r) const { return {r, r < rows}; }
  __device__ __forceinline__ float load(const Row& r, int64_t k) const {
    if (!r.valid) return 0.f;
    const int kk = static_cast<int>(k);  // as above
    const int64_t c = kk % inner, tap = kk / inner;
    const int64_t co = kRowsAreOut ? r.r : c, ci = kRowsAreOut ? c : r.r;
    return fastdl::cuda::to_math(w[co * kdim + ci * taps + tap]);
  }
};

// out = act(acc * scale + shift + bias + residual), stored in T.
template <typename T>
struct FwdEpilogue {
  const float *scale, *shift, *bias;
  const T* res;
  T* out;
  int64_t ohw, c0, res_sn, res_sc, res_sp, out_sn, out_sc, out_sp;
  Activation act;
  float slope;
  __device__ __forceinline__ FwdEpilogue(const Conv2dParams& p, int g) {
    scale = static_cast<const float*>(p.scale), shift = static_cast<const float*>(p.shift);
    bias = static_cast<const float*>(p.bias), res = static_cast<const T*>(p.residual);
    out = static_cast<T*>(p.out);
    ohw = p.out_h * p.out_w, c0 = static_cast<int64_t>(g) * (p.out_channels / p.groups);
    res_sn = p.res_stride_n, res_sc = p.res_stride_c, res_sp = p.res_stride_p;
    out_sn = p.out_stride_n, out_sc = p.out_stride_c, out_sp = p.out_stride_p;
    act = p.act, slope = p.slope;
  }
  __device__ __forceinline__ void operator()(int64_t m, int64_t co, float z) const {
    const int64_t n = m / ohw, pix = m % ohw, c = c0 + co;
    if (scale) z *= scale[c];
    if (shift) z += shift[c];
    if (bias) z += bias[c];
    if (res) z += fastdl::cuda::to_math(res[n * res_sn + c * res_sc + pix * res_sp]);
    out[n * out_sn + c * out_sc + pix * out_sp] = fastdl::cuda::from_math<T>(activate(act, z, slope));
  }
};

template <typename T, bool kAsyncA>
__global__ void __launch_bounds__(kThreads) conv2d_fwd_kernel(const Conv2dParams p) {
  const int g = static_cast<int>(blockIdx.z);
  const XByPixel<T> a(p, g);
  const WeightGather<T, true> b(p, g);
  const FwdEpilogue<T> epi(p, g);
  const int64_t K = p.kernel_h * p.kernel_w * (p.in_channels / p.groups);
  implicit_gemm_tile<T, kAsyncA>(a, b, epi, a.M, p.out_channels / p.groups, static_cast<int64_t>(blockIdx.x) * kBM,
                                 static_cast<int64_t>(blockIdx.y) * kBN, 0, K);
}

}  // namespace detail

template <typename T>
cudaError_t run_conv2d_fwd(const Conv2dParams& p, cudaStream_t stream) {
  const int64_t M = p.batch * p.out_h * p.out_w, cout_g = p.out_channels / p.groups;
  const dim3 grid(static_cast<unsigned>(fastdl::cuda::ceil_div<int64_t>(M, detail::kBM)),
                  static_cast<unsigned>(fastdl::cuda::ceil_div<int64_t>(cout_g, detail::kBN)),
                  static_cast<unsigned>(p.groups));
  if (detail::x_chunks_aligned<T>(p)) {
    return fastdl::cuda::launch_kernel(detail::conv2d_fwd_kernel<T, true>, grid, detail::kThreads,
                                       detail::gemm_smem_bytes<T, true>(), stream, p);
  }
  return fastdl::cuda::launch_kernel(detail::conv2d_fwd_kernel<T, false>, grid, detail::kThreads,
                                     detail::gemm_smem_bytes<T>(), stream, p);
}

}  // namespace fastdl::conv
