"""Python entry points of fastdl's kernels: one module per kernel family, each with the fast op,
its fake (meta) implementation for torch.compile, and a pure-PyTorch reference beside it."""

from fastdl.ops import fused_optim, rnn  # noqa: F401
