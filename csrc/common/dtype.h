// The storage dtype of a tensor as the torch-free params structs carry it, one enum for every kernel
// family: the CPU kernels switch on it to load and store rows (common/cpu_utils.h), the CUDA launchers
// to pick an instantiation. Math is fp32 for the 16-bit types and in their own type for fp32 / fp64.
#pragma once
#include <cstdint>

namespace fastdl {

enum class DType : int { kFloat32 = 0, kFloat64, kBFloat16, kFloat16 };

constexpr int64_t dtype_size(DType dt) { return dt == DType::kFloat64 ? 8 : dt == DType::kFloat32 ? 4 : 2; }

}  // namespace fastdl
