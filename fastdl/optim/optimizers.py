"""Drop-in replacements for torch.optim.{SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, NAdam}.

Same constructor arguments, param_groups, state keys and state_dict format as torch (each class
subclasses torch's), plus ``master_weights=False``. ``foreach`` and ``fused`` are accepted and kept
in the param groups for state_dict compatibility, but the step always runs fastdl's fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastdl.ops import fused_optim as ops
from fastdl.optim._fused import Bucket, FusedOptimizerMixin

_Opt = Tensor | None


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    """torch.optim.SGD with a fused multi-tensor step (momentum, dampening, nesterov, weight_decay, maximize)."""

    _state_names = ("momentum_buffer",)
    _uses_step = False

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        pass  # the momentum buffer is created in _launch: its first value is the gradient itself

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: _Opt, found_inf: _Opt) -> None:
        momentum = float(group["momentum"])
        kwargs = dict(lr=float(group["lr"]), momentum=momentum, dampening=float(group["dampening"]),
                      weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                      maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf)
        if momentum == 0:
            ops.fused_sgd_(bucket.params, bucket.grads, [], bucket.masters, is_first_step=False, **kwargs)
            return
        # torch initialises a momentum buffer to the (decayed) gradient on the parameter's first step,
        # so parameters with and without a buffer are two calls.
        use_master = bool(bucket.masters)
        first, later = [], []
        for j, p in enumerate(bucket.params):
            (later if "momentum_buffer" in self.state[p] else first).append(j)
        for indices, is_first in ((later, False), (first, True)):
            if not indices:
                continue
            params = [bucket.params[j] for j in indices]
            if is_first:
                dtype = torch.float32 if use_master else None
                for p in params:
                    self.state[p]["momentum_buffer"] = torch.empty_like(p, dtype=dtype)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            masters = [bucket.masters[j] for j in indices] if use_master else []
            ops.fused_sgd_(params, [bucket.grads[j] for j in indices], bufs, masters, is_first_step=is_first,
                           **kwargs)
            if is_first and found_inf is not None and found_inf.item() != 0:
                for p in params:  # a skipped first step leaves no buffer behind, as in torch
                    del self.state[p]["momentum_buffer"]


class Adagrad(FusedOptimizerMixin, torch.optim.Adagrad):
    """torch.optim.Adagrad (dense gradients) with a fused multi-tensor step."""

    _state_names = ("sum",)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "sum" not in state:  # torch creates Adagrad state in the constructor; this covers added groups
            state["step"] = self._zero_step(p)
            state["sum"] = torch.full_like(p, float(group["initial_accumulator_value"]))

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: _Opt, found_inf: _Opt) -> None:
        ops.fused_adagrad_(bucket.params, bucket.grads, bucket.states["sum"], bucket.steps, bucket.masters,
                           lr=float(group["lr"]), lr_decay=float(group["lr_decay"]),
                           weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                           maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf)


class RMSprop(FusedOptimizerMixin, torch.optim.RMSprop):
    """torch.optim.RMSprop with a fused multi-tensor step (alpha, eps, momentum, centered, maximize)."""

    _state_names = ("square_avg", "momentum_buffer", "grad_avg")

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = self._zero_step(p)
            state["square_avg"] = torch.zeros_like(p)
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = torch.zeros_like(p)

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: _Opt, found_inf: _Opt) -> None:
        s = bucket.states
        momentum, centered = float(group["momentum"]), bool(group["centered"])
        ops.fused_rmsprop_(bucket.params, bucket.grads, s["square_avg"], s["momentum_buffer"] if momentum > 0 else [],
                           s["grad_avg"] if centered else [], bucket.steps, bucket.masters, lr=float(group["lr"]),
                           alpha=float(group["alpha"]), eps=float(group["eps"]),
                           weight_decay=float(group["weight_decay"]), momentum=momentum, centered=centered,
                           maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf)


class Adam(FusedOptimizerMixin, torch.optim.Adam):
    """torch.optim.Adam with a fused multi-tensor step (betas, eps, weight_decay, amsgrad, maximize)."""

    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled_default = False

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = self._zero_step(p)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p)

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: _Opt, found_inf: _Opt) -> None:
        s = bucket.states
        beta1, beta2 = group["betas"]
        amsgrad = bool(group["amsgrad"])
        ops.fused_adam_(bucket.params, bucket.grads, s["exp_avg"], s["exp_avg_sq"],
                        s["max_exp_avg_sq"] if amsgrad else [], bucket.steps, bucket.masters,
                        lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                        weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), amsgrad=amsgrad,
                        maximize=bool(group["maximize"]),
                        decoupled_weight_decay=bool(group.get("decoupled_weight_decay", self._decoupled_default)),
                        grad_scale=grad_scale, found_inf=found_inf)


class AdamW(Adam, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay) with a fused multi-tensor step."""

    _decoupled_default = True


class Adamax(FusedOptimizerMixin, torch.optim.Adamax):
    """torch.optim.Adamax with a fused multi-tensor step."""

    _state_names = ("exp_avg", "exp_inf")

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = self._zero_step(p)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_inf"] = torch.zeros_like(p)

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: _Opt, found_inf: _Opt) -> None:
        beta1, beta2 = group["betas"]
        ops.fused_adamax_(bucket.params, bucket.grads, bucket.states["exp_avg"], bucket.states["exp_inf"],
                          bucket.steps, bucket.masters, lr=float(group["lr"]), beta1=float(beta1),
                          beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                          maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf)


class NAdam(FusedOptimizerMixin, torch.optim.NAdam):
    """torch.optim.NAdam (and NAdamW via decoupled_weight_decay=True) with a fused multi-tensor step."""

    _state_names = ("exp_avg", "exp_avg_sq")

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = self._zero_step(p)
            state["mu_product"] = torch.ones((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: _Opt, found_inf: _Opt) -> None:
        mu_products = []
        for p in bucket.params:
            state = self.state[p]
            mu = state["mu_product"]
            if mu.dtype != torch.float32 or mu.device != p.device:
                mu = state["mu_product"] = mu.to(device=p.device, dtype=torch.float32)
            mu_products.append(mu)
        beta1, beta2 = group["betas"]
        ops.fused_nadam_(bucket.params, bucket.grads, bucket.states["exp_avg"], bucket.states["exp_avg_sq"],
                         mu_products, bucket.steps, bucket.masters, lr=float(group["lr"]), beta1=float(beta1),
                         beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                         momentum_decay=float(group["momentum_decay"]),
                         decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                         maximize=bool(group["maximize"]), grad_scale=grad_scale, found_inf=found_inf)
