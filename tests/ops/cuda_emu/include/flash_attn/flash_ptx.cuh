// The emulator's csrc/flash_attn/flash_ptx.cuh: the same functions, executed by emu_runtime on the
// host, plus the CUDA built-ins the kernels use (threadIdx, __syncthreads, __shfl_xor_sync, ...: in
// emu_builtins.h), since the host compiler builds the kernels here. The conv kernels use its ldmatrix
// and mma too. Found before the real header because this
// include/ directory comes first on the include path (the kernels include "flash_attn/flash_ptx.cuh").
// A primitive added to the real header needs its twin here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_builtins.h"
#include "emu_runtime.h"
#include "flash_attn/flash_attn_params.h"

using std::max;
using std::min;

namespace fastdl::flash_attn {

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu::ldmatrix(r, 4, false, smem); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emu::ldmatrix(r, 4, true, smem); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem) { emu::ldmatrix(r, 2, false, smem); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) { emu::ldmatrix(r, 2, true, smem); }

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  emu::mma_16816(d, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}

namespace emu_detail {
inline uint16_t f2h(float x) {
  _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline uint16_t f2bf(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
}  // namespace emu_detail

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    return uint32_t(emu_detail::f2h(lo)) | (uint32_t(emu_detail::f2h(hi)) << 16);
  } else {
    return uint32_t(emu_detail::f2bf(lo)) | (uint32_t(emu_detail::f2bf(hi)) << 16);
  }
}

inline void cp_async_16(void* smem, const void* gmem, bool pred) { emu::cp_async_16(smem, gmem, pred); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait(N);
}

inline uint4 ld_shared_16(const void* smem) { return emu::ld_shared_16(smem); }
inline void st_shared_16(void* smem, uint4 v) { emu::st_shared_16(smem, v); }
inline void st_shared_4(void* smem, uint32_t v) { emu::st_shared_4(smem, v); }
inline uint4 ld_global_16(const void* gmem) { return emu::ld_global_16(gmem); }
inline void st_global_16(void* gmem, uint4 v) { emu::st_global_16(gmem, v); }
inline float ld_global_f32(const float* gmem) { return emu::ld_global_f32(gmem); }
inline void st_global_f32(float* gmem, float v) { emu::st_global_f32(gmem, v); }

// ex2.approx: the emulator is exact (the hardware's ~2 ulp is far below the tests' tolerances).
inline float exp2_fast(float x) { return std::exp2(x); }

// Registers the global memory a launch may touch (defined in flash_glue.cpp, from the params' shapes).
struct BwdArgs;
void on_launch(const FwdParams& p);
void on_launch(const BwdArgs& a);

template <typename Args>
cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, int threads, int smem_bytes, cudaStream_t,
                          const Args& args) {
  if (smem_bytes > 99 * 1024) return cudaErrorInvalidValue;  // what sm_86/89 allow a block
  on_launch(args);
  emu::launch([&] { kernel(args); }, grid, threads, smem_bytes);
  return cudaSuccess;
}

}  // namespace fastdl::flash_attn
