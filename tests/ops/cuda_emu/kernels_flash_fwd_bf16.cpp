// flash_fwd_bf16.cu compiled by the host compiler against the emulator's flash_ptx.cuh.
#include "flash_attn/flash_fwd_bf16.cu"
