// The small GEMMs of the CPU flash-attention tiles, register-tiled with at::vec.
//
// Why not BLAS: torch's x86 wheels ship MKL, whose sgemm runs its AVX2 kernel on AMD CPUs (a Zen 5
// EPYC: ymm-only code, 94 GFLOP/s on one core for a 128 x 256 x 64 tile), and torch's own SDPA pays that
// too. This micro-kernel, compiled for AVX-512 through at::vec, does 210-220 GFLOP/s on the same tiles
// (benchmarks/RESULTS.md). The tiles are small (K = headdim or a block of 64..256), so a plain
// broadcast-A / vector-B kernel with B packed into L1-resident panels gets most of the machine.
//
// C[M x N] (+)= alpha * A B. A is read through two strides, so A or A^T without a copy. B is packed: its
// N columns cut into panels of kPanel = 4 vectors (64 floats with AVX-512), panel j holding B(k, n) for
// j * kPanel <= n < (j + 1) * kPanel as a row-major [rows x kPanel] block (lanes past N unused). The
// micro-kernel keeps a kMR x kPanel tile of C in 4 * kMR = 24 vector registers, and per k loads 4 vectors
// of B and broadcasts kMR elements of A: 24 FMAs for 10 loads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_utils.h"

namespace fastdl::flash_attn::cpu_gemm {

using cpu::Vec;

template <typename T>
constexpr int64_t kVec = Vec<T>::size();
template <typename T>
constexpr int64_t kPanel = 4 * Vec<T>::size();
constexpr int64_t kMR = 6;
// K is cut into chunks so that a chunk of a B panel (128 x 64 floats = 32 KB) stays in a 48 KB L1d.
constexpr int64_t kKChunk = 128;

// A packed B operand: B(k, n) = ptr[(n / kPanel) * panel_stride + (row0 + k) * kPanel + n % kPanel].
template <typename T>
struct PackedB {
  const T* ptr;
  int64_t panel_stride;
  int64_t row0 = 0;
};

#if defined(CPU_CAPABILITY_AVX512)
// dst[k * ld_dst + n] = src[n * ld_src + k] for a 16 x 16 block, in registers (4 shuffle stages).
inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_dst, r[i]);
}
#endif

// Packs B(k, n) = src[k * rs + n * cs], k < K, n < N, as PackedB{dst, panel_stride, row0} reads it,
// converting to T. cs == 1 copies rows; rs == 1 transposes (K^T from K's rows), 16 x 16 blocks at a
// time in registers where the ISA allows.
template <typename S, typename T>
inline void pack_b(int64_t K, int64_t N, const S* src, int64_t rs, int64_t cs, T* dst, int64_t panel_stride,
                   int64_t row0 = 0) {
  constexpr int64_t P = kPanel<T>;
  for (int64_t n0 = 0; n0 < N; n0 += P) {
    const int64_t w = std::min(P, N - n0);
    T* panel = dst + n0 / P * panel_stride + row0 * P;
    if (cs == 1) {
      for (int64_t k = 0; k < K; ++k) cpu::convert_n(src + k * rs + n0, panel + k * P, w);
      continue;
    }
    int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
      if (rs == 1) {
        for (; n + 16 <= w; n += 16) {
          int64_t k = 0;
          for (; k + 16 <= K; k += 16) transpose_16x16(src + (n0 + n) * cs + k, cs, panel + k * P + n, P);
          for (; k < K; ++k)
            for (int64_t j = n; j < n + 16; ++j) panel[k * P + j] = src[(n0 + j) * cs + k];
        }
      }
    }
#endif
    for (; n < w; ++n) {
      const S* col = src + (n0 + n) * cs;
      for (int64_t k = 0; k < K; ++k) panel[k * P + n] = T(col[k * rs]);
    }
  }
}

template <typename T, int NV>
inline void micro_kernel(int64_t K, const T* a, int64_t a_rs, int64_t a_cs, int64_t mr, const T* b, T* c,
                         int64_t ldc, int64_t n_valid, T alpha, bool accumulate) {
  using V = Vec<T>;
  constexpr int64_t W = V::size(), P = kPanel<T>;
  V acc[kMR][NV];
  for (int i = 0; i < kMR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V(T(0));
  // Rows past mr repeat the last row (valid memory); their results are not stored.
  const T* rows[kMR];
  for (int i = 0; i < kMR; ++i) rows[i] = a + std::min<int64_t>(i, mr - 1) * a_rs;
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::loadu(b + k * P + v * W);
    const int64_t ak = k * a_cs;
    for (int i = 0; i < kMR; ++i) {
      const V ai(rows[i][ak]);
      for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(ai, bv[v], acc[i][v]);
    }
  }
  const V va(alpha);
  for (int64_t i = 0; i < mr; ++i) {
    for (int v = 0; v < NV; ++v) {
      const int64_t cnt = std::min<int64_t>(W, n_valid - v * W);
      T* cp = c + i * ldc + v * W;
      V r = acc[i][v] * va;
      if (cnt == W) {
        if (accumulate) r = r + V::loadu(cp);
        r.store(cp);
      } else {
        if (accumulate) r = r + V::loadu(cp, cnt);
        r.store(cp, cnt);
      }
    }
  }
}

// C[M x N] = alpha * A B (+ C when accumulate), C row-major with leading dimension ldc.
// A(i, k) = a[i * a_rs + k * a_cs].
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t a_rs, int64_t a_cs, const PackedB<T>& b,
          bool accumulate, T* c, int64_t ldc) {
  constexpr int64_t P = kPanel<T>, W = kVec<T>;
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, T(0));
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += P) {
    const int64_t w = std::min(P, N - n0);
    const T* panel = b.ptr + n0 / P * b.panel_stride + b.row0 * P;
    for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
      const int64_t kc = std::min(kKChunk, K - k0);
      const bool acc = accumulate || k0 > 0;
      for (int64_t i0 = 0; i0 < M; i0 += kMR) {
        const int64_t mr = std::min(kMR, M - i0);
        const T* ap = a + i0 * a_rs + k0 * a_cs;
        const T* bp = panel + k0 * P;
        T* cp = c + i0 * ldc + n0;
        switch ((w + W - 1) / W) {
          case 4: micro_kernel<T, 4>(kc, ap, a_rs, a_cs, mr, bp, cp, ldc, w, alpha, acc); break;
          case 3: micro_kernel<T, 3>(kc, ap, a_rs, a_cs, mr, bp, cp, ldc, w, alpha, acc); break;
          case 2: micro_kernel<T, 2>(kc, ap, a_rs, a_cs, mr, bp, cp, ldc, w, alpha, acc); break;
          default: micro_kernel<T, 1>(kc, ap, a_rs, a_cs, mr, bp, cp, ldc, w, alpha, acc); break;
        }
      }
    }
  }
}

}  // namespace fastdl::flash_attn::cpu_gemm
