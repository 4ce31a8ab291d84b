// fp16 flash-attention backward (D, dK/dV and dQ kernels) for every compiled head dim (flash_bwd_kernel.cuh).
#include "flash_attn/flash_bwd_kernel.cuh"

namespace fastdl::flash_attn {
template cudaError_t run_flash_bwd<__half, 32>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 64>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 96>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 128>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 160>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 192>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 224>(const BwdParams&, float*, cudaStream_t);
template cudaError_t run_flash_bwd<__half, 256>(const BwdParams&, float*, cudaStream_t);
}  // namespace fastdl::flash_attn
