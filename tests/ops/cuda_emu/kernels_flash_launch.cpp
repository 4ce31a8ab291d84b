// flash_launch.cu compiled by the host compiler against the emulator's flash_ptx.cuh.
#include "flash_attn/flash_launch.cu"
