// The emulator's csrc/common/cuda_simt.cuh: the same primitives, executed by emu_runtime on the host,
// plus the CUDA built-ins the kernels use (threadIdx, __syncthreads, ...: in emu_builtins.h), since the
// host compiler builds the kernels here. Shared loads and stores are checked for races and bounds; shuffles are warp
// collectives; atomics are plain adds (the threads of the emulator are cooperative fibers, switched only
// at collectives). A primitive added to the real header needs its twin here.
#pragma once
#include <cuda_runtime.h>
#include <vector_functions.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "emu_builtins.h"
#include "emu_runtime.h"

namespace fastdl::cuda {

inline unsigned char* dynamic_smem() { return emu::shared_base(); }

template <typename V>
inline V sld(const V* p) {
  emu::shared_read(p, sizeof(V));
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void sst(V* p, V v) {
  emu::shared_write(p, sizeof(V));
  std::memcpy(p, &v, sizeof(V));
}

inline float shfl_up(float v, int delta) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return emu::shfl_from(v, lane >= delta ? lane - delta : lane);
}
inline float shfl_down(float v, int delta) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return emu::shfl_from(v, lane + delta < 32 ? lane + delta : lane);
}
inline float shfl_xor(float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }

inline void atomic_add(float* p, float v) { *p += v; }

namespace emu_detail {
template <typename A, typename = void>
struct has_ranges : std::false_type {};
template <typename A>
struct has_ranges<A, std::void_t<decltype(emu_register_ranges(std::declval<const A&>()))>> : std::true_type {};
}  // namespace emu_detail

// These kernels' plain-pointer global accesses are not checked by the emulator. Kernels that also use
// flash_ptx.cuh's cp.async (the conv kernels) have their global reads checked: the glue defines an
// emu_register_ranges(const Args&) found by argument-dependent lookup, called here before each launch.
template <typename Args>
cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, int threads, int smem_bytes, cudaStream_t,
                          const Args& args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (smem_bytes > 99 * 1024) return cudaErrorInvalidValue;  // what sm_86/89 allow a block
  if constexpr (emu_detail::has_ranges<Args>::value) {
    emu::clear_ranges();
    emu_register_ranges(args);
  }
  emu::launch([&] { kernel(args); }, grid, threads, smem_bytes);
  return cudaSuccess;
}

}  // namespace fastdl::cuda
