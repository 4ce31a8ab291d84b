// Every hardware primitive the flash-attention kernels use, in one place: tensor-core MMA, ldmatrix,
// cp.async, shared/global accesses, the MUFU exp2 and the launch. The kernels (flash_fwd_kernel.cuh,
// flash_bwd_kernel.cuh) touch shared memory and their tensors only through these functions (the
// int32 cu_seqlens and fp32 ALiBi slopes are read directly), so that all data movement is visible
// in one place and the algorithm above it is ordinary C++ over documented fragment layouts.
//
// Why mma.sync rather than nvcuda::wmma: the online softmax works on the score tile while it sits in
// the accumulator registers (row max, exp2, row sum) and then feeds P to the next MMA as its A
// operand without a trip through shared memory. That needs to know which thread holds which element.
// wmma's fragment layout is unspecified ("opaque"), so a wmma kernel would store S to shared memory,
// do the softmax there and reload it; mma.sync's layouts are specified in the PTX ISA (section
// "Matrix Fragments for mma.m16n8k16 with floating point type"), and the accumulator layout of two
// adjacent 16x8 tiles is exactly the A-operand layout of one 16x16 tile (FlashAttention-2's register
// reuse, see convert_a_frag in flash_common.cuh). m16n8k16 with fp16/bf16 inputs and fp32
// accumulation needs sm_80.
//
// Fragment layouts used throughout (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A (16x16, row-major), 4 x 32-bit regs of 2 elements: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1],
//     a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]   (the lower 16 bits hold the lower column)
//   B (16x8, "col"), 2 regs: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D (16x8 fp32), 4 floats: c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// ldmatrix.x4 loads four 8x8 matrices of 16-bit elements; lanes 8i..8i+7 give the addresses of the
// 8 rows (16 bytes each) of matrix i, and each lane receives, per matrix, row g, columns 2t..2t+1
// (with .trans: rows 2t..2t+1 of column g, i.e. the transposed matrix). .x2 uses lanes 0..15.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastdl::flash_attn {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---- ldmatrix: shared -> fragments, 16-byte aligned row addresses --------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(smem)));
}

// ---- mma.sync m16n8k16, fp32 accumulation in place: d += a * b ---------------------------------

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_16816: fp16 or bf16 inputs");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one 32-bit register of two fp16/bf16 (round to nearest even), lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;  // one cvt.rn.{f16,bf16}x2.f32; memcpy moves the bits without an aliasing violation
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  }
  return bits;
}

// ---- cp.async: 16 bytes global -> shared, bypassing L1 and registers -------------------------------

// With pred false nothing is read and the 16 bytes are zero-filled (src-size 0); gmem must still be a
// valid address (callers pass the tile's first row).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight. Other threads' copies
// become visible only after a __syncthreads that follows their own wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- plain accesses (addresses aligned to their size) -----------------------------------------------

__device__ __forceinline__ uint4 ld_shared_16(const void* smem) { return *static_cast<const uint4*>(smem); }
__device__ __forceinline__ void st_shared_16(void* smem, uint4 v) { *static_cast<uint4*>(smem) = v; }
__device__ __forceinline__ void st_shared_4(void* smem, uint32_t v) { *static_cast<uint32_t*>(smem) = v; }
__device__ __forceinline__ uint4 ld_global_16(const void* gmem) { return *static_cast<const uint4*>(gmem); }
__device__ __forceinline__ void st_global_16(void* gmem, uint4 v) { *static_cast<uint4*>(gmem) = v; }
__device__ __forceinline__ float ld_global_f32(const float* gmem) { return *gmem; }
__device__ __forceinline__ void st_global_f32(float* gmem, float v) { *gmem = v; }

// ---- math ---------------------------------------------------------------------------------------------

// 2^x on the MUFU unit (ex2.approx.ftz: max 2 ulp, exp2(-inf) = +0), as FlashAttention's softmax uses
// it. Spelled out because setup.py does not pass --use_fast_math, and exp2f without it wraps the same
// instruction in handling of denormal results that a softmax does not need.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- launch -------------------------------------------------------------------------------------------

// kernel<<<grid, threads, smem_bytes, stream>>>(args), first raising the kernel's dynamic shared memory
// limit when it needs more than the default 48 KB. Returns the launch error, without synchronising.
template <typename Args>
cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                          const Args& args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fastdl::flash_attn
