// Just enough of CUDA's device language for the host compiler to build csrc/paged_attn/paged_attn_kernel.cuh
// and run its kernels on the CPU: every CUDA thread of a CTA is a std::thread, __syncthreads is a
// std::barrier over the CTA, and __shfl_xor_sync exchanges through a per-warp slot array between two warp
// barriers. CTAs run one after another, sharing one dynamic shared-memory buffer. It checks the kernels'
// logic (indexing, masks, online softmax, split-K and its reduction), not their speed or memory model.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the macros below: it names parameters gridDim and blockDim
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __launch_bounds__(n)
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#define __shared__
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

namespace host_cuda {
inline thread_local uint3 thread_idx, block_idx;
inline dim3 grid_dim, block_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shfl_slots[1024];
}  // namespace host_cuda

#define threadIdx (host_cuda::thread_idx)
#define blockIdx (host_cuda::block_idx)
#define gridDim (host_cuda::grid_dim)
#define blockDim (host_cuda::block_dim)

inline void __syncthreads() { host_cuda::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = host_cuda::thread_idx.x, warp = t / 32;
  auto& bar = *host_cuda::warp_barriers[warp];
  host_cuda::shfl_slots[t] = v;
  bar.arrive_and_wait();
  const float other = host_cuda::shfl_slots[warp * 32 + ((t % 32) ^ unsigned(lane_mask))];
  bar.arrive_and_wait();
  return other;
}

inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;

namespace host_cuda {
// Runs kernel() for every thread of every CTA of grid, threads threads per CTA.
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
  grid_dim = grid;
  block_dim = dim3(threads, 1, 1);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        block_barrier = &bar;
        warp_barriers.clear();
        for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_idx = uint3{t, 0, 0};
            block_idx = uint3{x, y, z};
            kernel();
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}
}  // namespace host_cuda
