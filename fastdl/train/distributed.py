"""Multi-process training: the same script under ``torchrun --nproc_per_node N``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` then joins the process group (gloo on
CPU, NCCL on CUDA, one GPU per process: cuda:LOCAL_RANK). Without them everything here is a no-op
for a single process, so one code path serves both.

Two ways to spread the model:

* ``ddp`` (default): DistributedDataParallel. Every rank holds the whole model and optimizer; the
  gradients are averaged in backward, so all ranks take identical steps.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6), CUDA only. Each
  ``nn.ModuleList`` element (a transformer block, say) is one shard unit, then the root. Parameters
  become DTensors, which fastdl's fused kernels do not take yet, so the trainer uses the torch
  optimizer of the same name; checkpoints gather full state dicts to rank 0 through
  ``torch.distributed.checkpoint.state_dict``. Every rank must run the same number of forward passes,
  so evaluation pads the last shard by repeating samples (a few may count twice in the metrics).
  This path is not exercised by the CPU test suite and has not been run on a GPU yet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastdl.train.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv(int(os.environ.get("RANK", "0")) if launched() else 0,
                   int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1,
                   int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0)


def setup(device_type: str) -> DistEnv:
    """Joins the process group if torchrun started us and nobody has yet; returns this process's place."""
    if launched() and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return env()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``device``) when running distributed, else ``model``."""
    if not env().enabled:
        return model
    if mode == "fsdp":
        if device.type != "cuda":
            raise ConfigError("distributed 'fsdp' (FSDP2) is supported on CUDA only here; use 'ddp' on CPU")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ConfigError(f"distributed 'fsdp' needs torch >= 2.6 (fully_shard); this is {torch.__version__}"
                              ) from None
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for all but the last micro-batch of an accumulated step."""
    if enabled:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        yield
    else:
        yield


def model_state_dict(model: nn.Module) -> dict[str, Any]:
    """The full (unsharded) state dict; under FSDP2 a collective, with the values on rank 0 only."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_model_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state)


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
