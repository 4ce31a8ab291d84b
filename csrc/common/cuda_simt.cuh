// The SIMT primitives of the plain-CUDA kernels (selective scan, causal conv1d, recurrent cells):
// dynamic shared memory, shared loads/stores, warp shuffles, float atomics and the launch. Kernels
// reach shared memory and the warp only through these, so that the CPU emulator of tests/ops/cuda_emu
// (its include/common/cuda_simt.cuh twin shadows this file) can run the kernels and check every
// shared access for races and bounds. A primitive added here needs its twin there.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastdl::cuda {

// The block's dynamic shared memory (the launch's smem_bytes), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fastdl_simt_smem[];
  return fastdl_simt_smem;
}

template <typename V>
__device__ __forceinline__ V sld(const V* p) {
  return *p;
}

template <typename V>
__device__ __forceinline__ void sst(V* p, V v) {
  *p = v;
}

// Full-warp shuffles: every lane of the warp must call them together.
__device__ __forceinline__ float shfl_up(float v, int delta) { return __shfl_up_sync(0xffffffffu, v, delta); }
__device__ __forceinline__ float shfl_down(float v, int delta) { return __shfl_down_sync(0xffffffffu, v, delta); }
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }

// Launches kernel(args) on stream; opts into more than 48 KB of dynamic shared memory when asked.
template <typename Args>
cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                          const Args& args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fastdl::cuda
