// The fused conv2d forward (conv_fwd_{fp16,bf16,fp32}.cu) and the dtype dispatch (conv_launch.cu), compiled
// by the host compiler against the emulator's flash_attn/flash_ptx.cuh and common/cuda_simt.cuh.
#include "conv/conv_fwd_bf16.cu"
#include "conv/conv_fwd_fp16.cu"
#include "conv/conv_fwd_fp32.cu"
#include "conv/conv_launch.cu"
