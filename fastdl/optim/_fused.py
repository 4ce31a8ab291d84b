"""Shared machinery of fastdl's drop-in optimizers.

Each optimizer subclasses the matching ``torch.optim`` class, so its constructor, ``param_groups``,
``state`` keys, ``state_dict`` format, hooks and LR-scheduler support are torch's own. Only
``step()`` differs: per parameter group and per (device, dtype) it gathers the tensors once and
makes one call to the fused kernel ``torch.ops.fastdl.fused_<rule>_``.

Everything that can fail is checked before the first kernel launch, so a bad step leaves every
parameter and every state tensor as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class Bucket:
    """The tensors of one group that share a device and dtype: one kernel call."""

    __slots__ = ("params", "grads", "states", "steps", "masters", "extra")

    def __init__(self, state_names: tuple[str, ...]):
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.states: dict[str, list[Tensor]] = {name: [] for name in state_names}
        self.steps: list[Tensor] = []
        self.masters: list[Tensor] = []
        self.extra: dict[str, list[Tensor]] = {}


class FusedOptimizerMixin:
    """Replaces ``step()`` of a torch.optim class by fastdl's fused multi-tensor kernel.

    Subclasses set ``_state_names`` (state buffers in kernel order, with torch's state keys) and
    implement ``_init_state`` and ``_launch``. ``master_weights=True`` keeps an fp32 copy of every
    bf16/fp16 parameter (``state["master_param"]``) and its state in fp32; the bf16 parameter is the
    rounded master after each step.
    """

    # torch.amp.GradScaler hands us grad_scale/found_inf instead of unscaling and checking itself.
    _step_supports_amp_scaling = True
    _state_names: tuple[str, ...] = ()
    _uses_step = True

    def __init__(self, params: Iterable, *args: Any, master_weights: bool = False, **kwargs: Any) -> None:
        if kwargs.get("differentiable", False):
            raise ValueError(f"{type(self).__name__}: differentiable=True is not supported by fused kernels")
        self._master_weights_default = bool(master_weights)
        super().__init__(params, *args, **kwargs)
        self.defaults["master_weights"] = self._master_weights_default

    @property
    def _name(self) -> str:
        return f"fastdl.optim.{type(self).__name__}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._state_checked = False
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("master_weights", getattr(self, "_master_weights_default", False))
        try:
            self._check_params(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_params(self, group: dict[str, Any], index: int) -> None:
        devices = set()
        for i, p in enumerate(group["params"]):
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(
                    f"{self._name}: parameter {i} of param group {index} has dtype {p.dtype}; expected a "
                    f"real floating-point tensor (float32, float64, bfloat16 or float16)"
                )
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"{self._name}: param group {index} mixes devices {sorted(map(str, devices))}; put the "
                f"parameters of each device in their own param group"
            )

    def _check_hyperparameters(self, group: dict[str, Any], index: int) -> None:
        """torch validates hyperparameters in the constructor only; a group edited later is checked here."""
        def bad(name: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"{self._name}: param_groups[{index}][{name}] must be {expected}, got {value}")

        lr = float(group["lr"])
        if not lr >= 0.0:
            raise bad("'lr'", lr, ">= 0")
        if "eps" in group and not float(group["eps"]) >= 0.0:
            raise bad("'eps'", group["eps"], ">= 0")
        if "weight_decay" in group and not float(group["weight_decay"]) >= 0.0:
            raise bad("'weight_decay'", group["weight_decay"], ">= 0")
        for key in ("momentum", "alpha", "lr_decay", "momentum_decay"):
            if key in group and not float(group[key]) >= 0.0:
                raise bad(f"'{key}'", group[key], ">= 0")
        if group.get("nesterov", False) and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
            raise ValueError(f"{self._name}: param_groups[{index}]: nesterov momentum requires momentum > 0 and "
                             f"zero dampening, got momentum={group['momentum']}, dampening={group['dampening']}")
        if "betas" in group:
            for k, beta in enumerate(group["betas"]):
                if not 0.0 <= float(beta) < 1.0:
                    raise bad(f"'betas'][{k}", float(beta), "in [0, 1)")

    def _gather(self, group: dict[str, Any], index: int) -> dict[tuple[torch.device, torch.dtype], Bucket]:
        """Validates the group's gradients and groups the tensors by (device, dtype). Touches nothing.

        This runs for every parameter at every step, so it checks with cheap attribute reads; the
        kernel re-checks devices, shapes and strides and names the offending tensor.
        """
        buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{self._name} does not support sparse gradients (parameter {i} of param "
                                   f"group {index}); use torch.optim.SparseAdam or a dense gradient")
            if g.dtype is not p.dtype or g.shape != p.shape:
                raise RuntimeError(
                    f"{self._name}: the gradient of parameter {i} of param group {index} is "
                    f"{g.dtype} {tuple(g.shape)} on {g.device}, but the parameter is {p.dtype} "
                    f"{tuple(p.shape)} on {p.device}"
                )
            key = (p.device, p.dtype)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(self._state_names)
            bucket.params.append(p)
            bucket.grads.append(g)
        return buckets

    def _fill_state(self, group: dict[str, Any], bucket: Bucket) -> None:
        """Creates missing state lazily (as torch does) and collects it in kernel order.

        State made here is right by construction. State that came from elsewhere (load_state_dict,
        torch's own constructor) is lined up once with the kernel's dtype, device and strides.
        """
        use_master = bool(group.get("master_weights", False)) and bucket.params[0].dtype in _LOW_PRECISION
        recheck = not getattr(self, "_state_checked", False)
        state_dtype = torch.float32 if use_master else bucket.params[0].dtype
        named_lists = list(bucket.states.items())
        for j, p in enumerate(bucket.params):
            state = self.state[p]
            self._init_state(group, p, state)
            if use_master and "master_param" not in state:
                state["master_param"] = p.detach().float()
            if recheck:
                self._line_up(state, p, state_dtype)
            for name, out in named_lists:
                buf = state.get(name)
                if buf is not None:
                    out.append(buf)
            if self._uses_step:
                bucket.steps.append(state["step"])
            if use_master:
                bucket.masters.append(state["master_param"])
            g = bucket.grads[j]
            if not (g.is_contiguous() and p.is_contiguous()) and g.stride() != p.stride():
                bucket.grads[j] = torch.empty_like(p).copy_(g)
        for name in list(bucket.states):
            if len(bucket.states[name]) != len(bucket.params):
                bucket.states[name] = []  # buffer not used under the group's options

    def _line_up(self, state: dict[str, Any], p: Tensor, state_dtype: torch.dtype) -> None:
        for name in self._state_names:
            buf = state.get(name)
            if buf is not None and (buf.dtype != state_dtype or buf.device != p.device or buf.stride() != p.stride()):
                state[name] = torch.empty_like(p, dtype=state_dtype).copy_(buf)
        step = state.get("step")
        if step is not None and (step.dtype != torch.float32 or step.device != p.device):
            # The kernel increments the counter where the parameter lives (no host sync on CUDA).
            state["step"] = step.to(device=p.device, dtype=torch.float32)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        raise NotImplementedError

    @staticmethod
    def _zero_step(p: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)

        work = []
        for index, group in enumerate(self.param_groups):
            self._check_hyperparameters(group, index)
            work.append((group, self._gather(group, index)))
        for group, buckets in work:
            for bucket in buckets.values():
                self._fill_state(group, bucket)
        self._state_checked = True
        for group, buckets in work:
            for (device, _), bucket in buckets.items():
                scale = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
                inf = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
                self._launch(group, bucket, scale, inf)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state_checked = False
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter dtype; master weights keep their state in fp32.
        saved = state_dict["state"]
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid in saved and "master_param" in saved[pid]:
                for name, value in saved[pid].items():
                    if isinstance(value, Tensor) and name != "step" and value.dtype == torch.float32:
                        self.state[p][name] = value.to(device=p.device, copy=True)
