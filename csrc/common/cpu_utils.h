// Vectorized helpers for the CPU kernels. SIMD width comes from at::vec, whose ISA setup.py matches to
// the -march the extension is built with (AVX512: 16 floats, AVX2: 8 floats).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "common/dtype.h"

namespace fastdl::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Math type for a storage type: fp64 stays fp64, everything else computes in fp32.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elementwise helpers that read the same for a scalar and a vector, so that one templated
// update rule serves both the SIMD body and scalar code.
template <typename T>
inline Vec<T> vsqrt(const Vec<T>& x) { return x.sqrt(); }
template <typename T>
inline Vec<T> vabs(const Vec<T>& x) { return x.abs(); }
template <typename T>
inline Vec<T> vmax(const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }

// Copy n elements between storage and math types; identity copies are skipped by the callers.
template <typename src_t, typename dst_t>
inline void convert_n(const src_t* src, dst_t* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- rows in any storage dtype <-> math-type arrays ----
// The params structs carry type-erased pointers and a DType; kernels compute on fp32 / fp64 rows.

// dst[i] = src[i * stride], i < n, converted to T.
template <typename S, typename T>
inline void load_strided(const S* src, int64_t stride, int64_t n, T* dst) {
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

// dst[i * stride] = src[i], i < n, converted to S.
template <typename T, typename S>
inline void store_strided(const T* src, int64_t n, S* dst, int64_t stride) {
  if (stride == 1) {
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(dst, src, n * sizeof(T));
    } else {
      at::vec::convert(src, dst, n);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<S>(src[i]);
  }
}

// dst[i] = base[offset + i * stride], i < n, converted to T.
template <typename T>
inline void load_row(const void* base, DType dt, int64_t offset, int64_t stride, int64_t n, T* dst) {
  switch (dt) {
    case DType::kFloat32: return load_strided(static_cast<const float*>(base) + offset, stride, n, dst);
    case DType::kFloat64: return load_strided(static_cast<const double*>(base) + offset, stride, n, dst);
    case DType::kBFloat16: return load_strided(static_cast<const c10::BFloat16*>(base) + offset, stride, n, dst);
    case DType::kFloat16: return load_strided(static_cast<const c10::Half*>(base) + offset, stride, n, dst);
  }
}

// base[offset + i * stride] = src[i], i < n.
template <typename T>
inline void store_row(const T* src, int64_t n, void* base, DType dt, int64_t offset, int64_t stride = 1) {
  switch (dt) {
    case DType::kFloat32: return store_strided(src, n, static_cast<float*>(base) + offset, stride);
    case DType::kFloat64: return store_strided(src, n, static_cast<double*>(base) + offset, stride);
    case DType::kBFloat16: return store_strided(src, n, static_cast<c10::BFloat16*>(base) + offset, stride);
    case DType::kFloat16: return store_strided(src, n, static_cast<c10::Half*>(base) + offset, stride);
  }
}

// Starts loading the n elements of a unit-stride row into cache (strided rows are left to the hardware):
// rows of a few cache lines, each in a different page, are too short a run for the hardware prefetcher.
template <bool kWrite = false>
inline void prefetch_row(const void* base, DType dt, int64_t offset, int64_t stride, int64_t n) {
  if (base == nullptr || stride != 1 || n <= 0) return;
  const int64_t es = dtype_size(dt);
  const char* ptr = static_cast<const char*>(base) + offset * es;
  for (int64_t i = 0; i < n * es; i += 64) __builtin_prefetch(ptr + i, kWrite ? 1 : 0, 3);
}

// Flushes denormals to zero on this thread while a kernel runs, and restores the mode after. A state
// that decays for long (zero-padded input) walks through the denormal range, where every multiply
// takes a microcode assist of ~100 cycles; values that small do not change any result.
struct DenormalsAreZero {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

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

// Loads / stores cnt <= Vec<T>::size() elements.
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

// exp for a softmax: fp32 uses at::vec's 20-ulp polynomial (what torch's own CPU flash attention uses; about
// 1.2e-6 relative), fp64 the accurate Sleef exp.
template <typename T>
inline Vec<T> vexp_u20(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  return Vec<T>(T(1)) / (Vec<T>(T(1)) + x.neg().exp());
}

}  // namespace fastdl::cpu
