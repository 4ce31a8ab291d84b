"""Python entry points of fastdl's kernels: one module per kernel family, each with the fast op,
its fake (meta) implementation for torch.compile, and a pure-PyTorch reference beside it."""

from fastdl.ops import conv, flash_attn, fused_optim, paged_attn, rnn  # noqa: F401
from fastdl.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from fastdl.ops.conv import conv2d_fused, conv2d_fused_ref, conv2d_pack_weight
from fastdl.ops.flash_attn import (
    attention_ref,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from fastdl.ops.fused_layers import rms_norm, rms_norm_ref, rotary_emb, rotary_emb_ref, swiglu, swiglu_ref
from fastdl.ops.paged_attn import (
    copy_blocks,
    copy_blocks_ref,
    flash_attn_with_kvcache,
    flash_attn_with_kvcache_ref,
    reshape_and_cache,
    reshape_and_cache_ref,
)
from fastdl.ops.selective_scan import (
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

__all__ = [
    "attention_ref",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "conv2d_fused",
    "conv2d_fused_ref",
    "conv2d_pack_weight",
    "copy_blocks",
    "copy_blocks_ref",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "rms_norm",
    "rms_norm_ref",
    "rotary_emb",
    "rotary_emb_ref",
    "flash_attn_with_kvcache",
    "flash_attn_with_kvcache_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "swiglu",
    "swiglu_ref",
]
