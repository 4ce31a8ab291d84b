// Emulator stub: the current stream is the host, the device an sm_80.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>
#include <cstring>
namespace at::cuda {
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) {
  static cudaDeviceProp p = [] {
    cudaDeviceProp q{};
    q.major = 8;
    q.minor = 0;
    std::strcpy(q.name, "emulated sm_80");
    return q;
  }();
  return &p;
}
}  // namespace at::cuda
