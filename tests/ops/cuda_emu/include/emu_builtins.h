// The CUDA built-ins the kernels use (threadIdx, __syncthreads, __shfl_xor_sync, ...), as calls into
// emu_runtime, for the host compiler. Shared by the primitive twins flash_attn/flash_ptx.cuh and
// common/cuda_simt.cuh, so that a kernel may include both (the conv kernels do).
#pragma once
#include "emu_runtime.h"

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
