// Argument checks whose messages say what was expected and what came (cf. flash-attention's CHECK_SHAPE).
#pragma once
#include <torch/types.h>

#include <sstream>
#include <vector>

#include "common/dtype.h"

namespace fastdl {

// The params dtype of a float tensor; anything else is an error naming the op and the argument.
inline DType to_dtype(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", t);
  }
}

// The dtype the kernels compute and accumulate in: fp64 for fp64 inputs (gradcheck), fp32 otherwise.
inline at::ScalarType math_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

}  // namespace fastdl

// CHECK_SHAPE(q, batch, seqlen, heads, dim): "q must have shape [2, 128, 8, 64], got [2, 128, 8, 32]".
#define CHECK_SHAPE(x, ...)                                                                      \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x " must have shape ",              \
              fastdl::shape_str(c10::IntArrayRef({__VA_ARGS__})), ", got ", fastdl::shape_str((x).sizes()))

#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())

#define CHECK_DEVICE(x, expected_device) \
  TORCH_CHECK((x).device() == (expected_device), #x " must be on ", (expected_device), ", got ", (x).device())

#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

#define CHECK_LAST_DIM_CONTIGUOUS(x) \
  TORCH_CHECK((x).stride(-1) == 1, #x " must have a contiguous last dimension, got stride ", (x).stride(-1))
