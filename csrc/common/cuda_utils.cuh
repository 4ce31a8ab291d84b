// Small torch-free helpers shared by the CUDA kernels: ceil_div, error checks, aligned vector
// loads/stores and conversions between storage types (fp32, fp64, bf16, fp16) and their math type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

namespace fastdl::cuda {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace fastdl::cuda

// Evaluates a CUDA runtime call; on failure prints the call and its location to stderr and returns
// the error from the enclosing function, which must return cudaError_t. Launchers return it to the
// torch binding, which raises it as a Python exception (C10_CUDA_CHECK).
#define FASTDL_CUDA_CHECK(expr)                                                                     \
  do {                                                                                              \
    const cudaError_t fastdl_cuda_status = (expr);                                                  \
    if (fastdl_cuda_status != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,                     \
                   cudaGetErrorString(fastdl_cuda_status));                                         \
      return fastdl_cuda_status;                                                                    \
    }                                                                                               \
  } while (0)

namespace fastdl::cuda {

// Math type of a storage type: fp64 computes in fp64, everything else in fp32 (torch's opmath_t).
template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Storage -> math. The conversion intrinsics are spelled out because torch's extension build defines
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename T>
__device__ __forceinline__ math_t<T> to_math(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return x;
  }
}

// Math -> storage, rounding to nearest even as torch's bf16/fp16 casts do.
template <typename T>
__device__ __forceinline__ T from_math(math_t<T> x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return x;
  }
}

// N elements moved by one instruction: 16 B for 4 floats (LDG.128), 8 B for 4 bf16, 32 B (two
// 16 B accesses) for 4 doubles. The pointer must be aligned to the whole vector.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * N) == 0;
}

// Loads N storage elements at ptr (aligned, see is_aligned) and converts them to the math type.
template <int N, typename T>
__device__ __forceinline__ void load_vector(const T* ptr, math_t<T> (&out)[N]) {
  const AlignedVector<T, N> v = *reinterpret_cast<const AlignedVector<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_math(v.val[i]);
}

// Converts N math values to storage and writes them at ptr (aligned) in one store.
template <int N, typename T>
__device__ __forceinline__ void store_vector(T* ptr, const math_t<T> (&in)[N]) {
  AlignedVector<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.val[i] = from_math<T>(in[i]);
  *reinterpret_cast<AlignedVector<T, N>*>(ptr) = v;
}

}  // namespace fastdl::cuda
