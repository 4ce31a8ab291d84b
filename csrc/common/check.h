// Argument checks whose messages say what was expected and what came (cf. flash-attention's CHECK_SHAPE).
#pragma once
#include <torch/types.h>

#include <sstream>
#include <vector>

namespace fastdl {

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
