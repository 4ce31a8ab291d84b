// Emulator stub: launches return cudaError_t like the real ones; non-zero raises.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#define C10_CUDA_CHECK(expr)                                                    \
  do {                                                                          \
    const cudaError_t emu_err = (expr);                                         \
    TORCH_CHECK(emu_err == cudaSuccess, "CUDA error ", static_cast<int>(emu_err)); \
  } while (0)
