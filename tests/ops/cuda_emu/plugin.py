"""pytest plugin that runs the CUDA tests on the CPU through the emulator:

    PYTHONPATH=tests/ops python -m pytest -p cuda_emu.plugin tests/ops/test_flash_attn_cuda.py \
        -k "not bad_inputs and not bad_varlen and not registered"

The emulated kernels replace the CPU kernels of the four flash-attention ops for the session, Tensor.cuda()
returns the tensor itself, and `cuda`-marked tests are not skipped. Tests that create tensors with
device="cuda" or compare devices cannot run this way (hence the -k above). Slow: about 20 s per test.
"""

import torch

import fastdl  # noqa: F401  (the op schemas)

from . import load_flash_emu, pretend_cuda, pytest_collection_modifyitems  # noqa: F401 (the hook)

_emu = load_flash_emu()
_lib = torch.library.Library("fastdl", "IMPL")
_lib.impl("flash_attn_fwd", lambda *args: tuple(_emu.fwd(*args)), "CPU")
_lib.impl("flash_attn_varlen_fwd", lambda *args: tuple(_emu.varlen_fwd(*args)), "CPU")
_lib.impl("flash_attn_bwd", lambda *args: tuple(_emu.bwd(*args)), "CPU")
_lib.impl("flash_attn_varlen_bwd", lambda *args: tuple(_emu.varlen_bwd(*args)), "CPU")
pretend_cuda()

