// The fused conv2d backward (conv_bwd_{fp16,bf16,fp32}.cu), compiled by the host compiler against the
// emulator's flash_attn/flash_ptx.cuh and common/cuda_simt.cuh.
#include "conv/conv_params.h"

// Defined in conv_glue.cpp; the emulator's launch_kernel calls it before each launch (cuda_simt.cuh).
namespace fastdl::conv {
void emu_register_ranges(const Conv2dParams& p);
}  // namespace fastdl::conv

#include "conv/conv_bwd_bf16.cu"
#include "conv/conv_bwd_fp16.cu"
#include "conv/conv_bwd_fp32.cu"
