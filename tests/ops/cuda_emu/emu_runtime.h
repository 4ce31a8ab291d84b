// A small SIMT emulator that runs the CUDA flash-attention kernels on the CPU, for machines without a
// GPU. The kernels are compiled by the host compiler against include/flash_attn/flash_ptx.cuh, which
// replaces csrc/flash_attn/flash_ptx.cuh (every inline-PTX primitive the kernels use) with calls
// into this runtime. Each CUDA thread of a block is a fiber, blocks run one after another, and the
// warp collectives (mma.sync, ldmatrix, shuffles, __syncwarp) and __syncthreads execute once every
// participating thread has arrived. Checked on the way: shared-memory bounds, alignment and races
// (accesses of two threads that no barrier orders), global accesses against the tensors a launch
// may touch, collectives reached by only part of a warp or block.
#pragma once
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace emu {

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void sync_threads();
void sync_warp();
float shfl_xor(float v, int lane_mask);
// Each lane reads v of lane src_lane (its own v when src_lane is outside [0, 32)): shfl.idx/up/down.
float shfl_from(float v, int src_lane);

// The block's shared memory, and the race / bounds checks of a plain shared access by this thread
// (include/common/cuda_simt.cuh routes the scan, conv and RNN kernels' accesses through them).
unsigned char* shared_base();
void shared_read(const void* p, size_t bytes);
void shared_write(const void* p, size_t bytes);

// num matrices (1, 2, 4), .trans or not; writes num registers.
void ldmatrix(uint32_t* out, int num, bool trans, const void* smem_addr);
// d += a * b, inputs fp16 (is_bf16 false) or bf16.
void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, bool is_bf16);

void cp_async_16(void* smem, const void* gmem, bool pred);
void cp_async_commit();
void cp_async_wait(int n);

uint4 ld_shared_16(const void* p);
void st_shared_16(void* p, uint4 v);
void st_shared_4(void* p, uint32_t v);
uint4 ld_global_16(const void* p);
void st_global_16(void* p, uint4 v);
float ld_global_f32(const float* p);
void st_global_f32(float* p, float v);

// Global writes since clear_writes(): (address, bytes).
const std::vector<std::pair<uintptr_t, int>>& writes();
void clear_writes();

// Runs body for every thread of every CTA of the grid. Returns 0, or throws std::runtime_error with
// the first problem found (race, bad access, deadlock, divergent collective).
int launch(const std::function<void()>& body, dim3 grid, int threads, int smem_bytes);

// Global memory the kernels may read (cp.async, ld_global_16) / write (st_global_16).
void clear_ranges();
void add_read_range(const void* p, size_t bytes);
void add_write_range(const void* p, size_t bytes);

struct Stats {
  int64_t ctas = 0, mma = 0, ldmatrix = 0, syncs = 0, launches = 0;
  int64_t max_smem = 0;
};
Stats& stats();

// Visit order of the threads between barriers: 0 = ascending, 1 = descending, 2 = pseudo-random.
void set_schedule(int mode, uint32_t seed);

}  // namespace emu
