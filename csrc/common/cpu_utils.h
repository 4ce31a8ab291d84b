// Vectorized helpers for the CPU kernels. SIMD width comes from at::vec, whose ISA setup.py matches to
// the -march the extension is built with (AVX512: 16 floats, AVX2: 8 floats).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

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

}  // namespace fastdl::cpu
