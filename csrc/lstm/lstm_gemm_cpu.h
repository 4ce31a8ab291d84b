// Row-major GEMM on raw pointers for the recurrent layers: C = op(A) op(B) (+ C).
//
// The time loop issues ~3 GEMMs per step, a few hundred microseconds each at batch 32, hidden 512;
// going through at::mm would add a tensor wrap and a dispatch per call. Two backends, both BLAS that
// torch ships:
//
// * fp32 on AVX-512: at::native::cpublas::brgemm, oneDNN's batch-reduce GEMM micro-kernel (JIT, the
//   kernel oneDNN's own RNN primitive uses). We tile C into 32 x 32 blocks over at::parallel_for. On
//   an AMD EPYC (Zen 5) core it runs 32x512 @ 512x2048 at ~190 GFLOP/s where MKL's sgemm, which
//   takes its AVX2 path on non-Intel CPUs, runs at ~77 (benchmarks/RESULTS.md). brgemm takes plain
//   row-major operands, so transposed operands are copied once (callers pass weights pre-transposed).
// * otherwise (fp64, builds without AVX-512): MKL's Fortran sgemm_/dgemm_, which torch's x86 wheels
//   export and at::mm itself ends in. They are declared weak: a torch without them exported gets
//   at::Tensor::addmm_ on views of the buffers.
//
// Every output tile is computed by one thread with a fixed reduction order, so results do not depend
// on how tiles are spread over threads: bit-identical run to run.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(__AVX512F__)
#define FASTDL_RNN_BRGEMM 1
#else
#define FASTDL_RNN_BRGEMM 0
#endif

namespace fastdl::rnn::cpu {

template <typename T>
inline at::ScalarType scalar_type_of() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

#if FASTDL_RNN_BRGEMM
// C[M, N] (+)= A[M, K] B[K, N], all row-major, in 32 x 32 tiles of C, K in chunks of 512 accumulated in
// place. The K chunks matter for the weight gradients, where K is every row of the sequence: one
// brgemm call with K = 4096 streams a 512 KB strided B panel per tile and runs at ~28 GFLOP/s; chunks
// of 512 run at ~150 (benchmarks/RESULTS.md). A tile-chunk costs 2 * 32 * 32 * 512 = 1 MFLOP (~5 us);
// below ~1 MFLOP in all a thread handoff is not worth it.
inline void brgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      bool add_C, float* C, int64_t ldc, bool parallel) {
  constexpr int64_t kTile = 32, kChunk = 512;
  const int64_t mt = (M + kTile - 1) / kTile, nt = (N + kTile - 1) / kTile;
  const int64_t tiles = mt * nt;
  const bool small = !parallel || tiles * kTile * kTile * K < (int64_t(1) << 19);
  const bool a_in_l2 = M * std::min(K, kChunk) * int64_t(sizeof(float)) <= (int64_t(512) << 10);
  at::parallel_for(0, tiles, small ? tiles : 1, [&](int64_t begin, int64_t end) {
    // Each tile belongs to one thread, with a fixed order over K: results do not depend on threads.
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, K - k0);
      for (int64_t tile = begin; tile < end; ++tile) {
        // A (m x 512 chunk) within ~half of a 1 MB L2: column-block-major, each B panel (512 x 32,
        // 64 KB) is read once and A stays in L2. Larger A: row-block-major, each A block is read once.
        const int64_t m0 = (a_in_l2 ? tile % mt : tile / nt) * kTile, n0 = (a_in_l2 ? tile / mt : tile % nt) * kTile;
        const int64_t m = std::min(kTile, M - m0), n = std::min(kTile, N - n0);
        at::native::cpublas::brgemm(m, n, kc, lda, ldb, ldc, add_C || k0 > 0, A + m0 * lda + k0, B + k0 * ldb + n0,
                                    C + m0 * ldc + n0, /*is_vnni=*/false);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

// B packed in panels of nb columns: panel j holds columns [j * nb, (j + 1) * nb) of the [K, N] matrix as a
// contiguous [K, nb] block (zero past N). brgemm then streams one 64-256 KB block per output tile instead of
// K rows at a stride of N floats (8 KB for 4H = 2048: 512 rows of two cache lines each, spread over 4 MB,
// which the hardware prefetchers follow poorly).
//
// C[M, N] (+)= A[M, K] Bp, tiles of row_tile rows x nb columns, K in chunks of 512 accumulated in place.
// Panel-major tile order: a panel (<= 256 KB) stays in L2 while every row block of A passes over it.
// Larger row tiles pay where A and a panel fit L2 together: one Zen 5 core runs the forward's input
// projection, 256 rows x 8 panels of 128 columns, at ~200 GFLOP/s in 32-row tiles and ~224 as one 256-row
// call per panel (A 512 KB + a 256 KB panel; microbenchmark, benchmarks/RESULTS.md lstm).
inline void brgemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t nb,
                          bool add_C, float* C, int64_t ldc, bool parallel, int64_t row_tile = 32) {
  constexpr int64_t kChunk = 512;
  const int64_t kTile = row_tile;
  const int64_t mt = (M + kTile - 1) / kTile, nt = (N + nb - 1) / nb;
  const int64_t tiles = mt * nt;
  const bool small = !parallel || tiles * kTile * nb * K < (int64_t(1) << 19);
  at::parallel_for(0, tiles, small ? tiles : 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = (tile % mt) * kTile, j = tile / mt;
      const int64_t m = std::min(kTile, M - m0), n = std::min(nb, N - j * nb);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk)
        at::native::cpublas::brgemm(m, n, std::min(kChunk, K - k0), lda, nb, ldc, add_C || k0 > 0, A + m0 * lda + k0,
                                    Bp + (j * K + k0) * nb, C + m0 * ldc + j * nb, /*is_vnni=*/false);
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}
#endif

// Packs B ([K, N], row stride ldb; or stored transposed, [N, K], when trans_b) into brgemm_packed's panels
// of nb columns: Bp [ceil(N / nb), K, nb], zero past column N. Bp must hold ceil(N / nb) * K * nb values.
template <typename T>
void pack_b(bool trans_b, int64_t K, int64_t N, const T* B, int64_t ldb, int64_t nb, T* Bp) {
  const int64_t nt = (N + nb - 1) / nb;
  const auto opts = at::TensorOptions().dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat);
  at::Tensor src = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                           : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);  // [K, N]
  at::Tensor dst = at::from_blob(Bp, {nt, K, nb}, opts);
  const int64_t full = N / nb;
  if (full > 0) dst.narrow(0, 0, full).copy_(src.narrow(1, 0, full * nb).view({K, full, nb}).permute({1, 0, 2}));
  if (full < nt) {
    at::Tensor last = dst.select(0, full);
    last.zero_();
    last.narrow(1, 0, N - full * nb).copy_(src.narrow(1, full * nb, N - full * nb));
  }
}

#if FASTDL_RNN_BRGEMM
// out[M, N] = X[M, K] W[N, K]^T, W row-major as nn.Linear stores it, without transposing W: computed as
// out^T = W X^T with W as brgemm's A operand (its rows stream once, contiguous), X^T ([K, M], small at
// RNN batch sizes) as B, then out^T transposed back. For the cells, whose weights are not the op's to
// keep transposed between calls: transposing W [2048, 512] costs about as much as the GEMM itself.
inline void linear_nt(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const float* W, int64_t ldw,
                      float* C, int64_t ldc, bool parallel) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xt = at::from_blob(const_cast<float*>(X), {M, K}, {ldx, 1}, opts).t().contiguous();  // [K, M]
  at::Tensor ct = at::empty({N, M}, opts);
  brgemm_nn(N, M, K, W, ldw, xt.data_ptr<float>(), M, false, ct.data_ptr<float>(), M, parallel);
  at::from_blob(C, {M, N}, {ldc, 1}, opts).copy_(ct.t());
}
#endif

// C[M, N] (row stride ldc) = op(A) op(B) + (accumulate ? C : 0), with op(A) [M, K] and op(B) [K, N];
// trans_a: A is stored [K, M] (row stride lda), trans_b: B is stored [N, K] (row stride ldb).
// parallel = false keeps the brgemm path on the calling thread.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, bool accumulate, T* C, int64_t ldc, bool parallel = true) {
  if (M == 0 || N == 0) return;
  const auto opts = at::TensorOptions().dtype(scalar_type_of<T>());
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    if (!accumulate) c.zero_();
    return;
  }
#if FASTDL_RNN_BRGEMM
  if constexpr (std::is_same_v<T, float>) {
    at::Tensor a_copy, b_copy;
    if (trans_a) {
      a_copy = at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t().contiguous();
      A = a_copy.data_ptr<T>(), lda = K;
    }
    if (trans_b) {
      b_copy = at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t().contiguous();
      B = b_copy.data_ptr<T>(), ldb = N;
    }
    brgemm_nn(M, N, K, A, lda, B, ldb, accumulate, C, ldc, parallel);
    return;
  }
#endif
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const bool fits = M <= kIntMax && N <= kIntMax && K <= kIntMax && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax;
  const bool have_blas = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (have_blas && fits) {
    // Column-major BLAS sees a row-major matrix as its transpose: C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K);
    const int la = int(std::max<int64_t>(ldb, 1)), lb = int(std::max<int64_t>(lda, 1)), lc = int(std::max<int64_t>(ldc, 1));
    const T one(1), beta(accumulate ? 1 : 0);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    }
    return;
  }
  at::Tensor a = trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

}  // namespace fastdl::rnn::cpu
