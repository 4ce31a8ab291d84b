// Row-major GEMM on raw pointers for the recurrent layers: C = alpha * op(A) op(B) + beta * C.
//
// The time loop issues ~3 GEMMs per step, a few hundred microseconds each at batch 32, hidden 512;
// going through at::mm would add a tensor wrap and a dispatch per call. torch's x86 wheels link MKL and
// export its Fortran BLAS (sgemm_, dgemm_), which is what at::mm itself ends in for fp32/fp64
// (ATen/native/CPUBlas.cpp). The symbols are declared weak: where a torch build has no BLAS exported
// (e.g. some ARM wheels), the same call goes through at::Tensor::addmm_ on views of the buffers.
#pragma once
#include <ATen/ATen.h>

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

namespace fastdl::rnn::cpu {

template <typename T>
inline at::ScalarType scalar_type_of() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

// C[M, N] (row stride ldc) = alpha * op(A) * op(B) + beta * C, with op(A) [M, K] and op(B) [K, N];
// trans_a: A is stored [K, M] (row stride lda), trans_b: B is stored [N, K] (row stride ldb).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const bool fits = M <= kIntMax && N <= kIntMax && K <= kIntMax && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax;
  const bool have_blas = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (have_blas && fits && K > 0) {
    // Column-major BLAS sees a row-major matrix as its transpose: C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K);
    const int la = int(std::max<int64_t>(ldb, 1)), lb = int(std::max<int64_t>(lda, 1)), lc = int(std::max<int64_t>(ldc, 1));
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(scalar_type_of<T>());
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    beta == T(0) ? c.zero_() : c.mul_(beta);
    return;
  }
  at::Tensor a = trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

}  // namespace fastdl::rnn::cpu
