"""LAMB: layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", Algorithm 2), with its pure-PyTorch reference beside it.

Per tensor x with gradient g at step t:
    m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
    r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)     (no bias correction if disabled)
    u = r + weight_decay * x               (decoupled weight decay)
    trust = ||x|| / ||u||  (1 if either norm is 0)
    x = x - lr * trust * u
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastdl.ops import fused_optim as ops
from fastdl.optim._fused import Bucket, FusedOptimizerMixin


def lamb_ref(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             state_steps: list[Tensor], *, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
             bias_correction: bool = True, maximize: bool = False) -> None:
    """One LAMB step, one tensor at a time, in plain PyTorch (the reference for the fused kernel)."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        g = -g if maximize else g
        step += 1
        t = step.item()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1**t if bias_correction else 1.0
        bc2 = 1 - beta2**t if bias_correction else 1.0
        update = (m / bc1) / ((v / bc2).sqrt() + eps) + weight_decay * p
        p_norm, u_norm = p.norm(), update.norm()
        trust = (p_norm / u_norm).item() if p_norm > 0 and u_norm > 0 else 1.0
        p.add_(update, alpha=-lr * trust)


def _check_args(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class LAMB(FusedOptimizerMixin, torch.optim.Optimizer):
    """LAMB with a fused multi-tensor step. Defaults follow NVIDIA apex's FusedLAMB (eps=1e-6, wd=0.01).

    Args:
        params: parameters or param groups.
        lr: learning rate. betas: coefficients of the running averages of g and g^2.
        eps: added to the denominator. weight_decay: decoupled weight decay (part of the update u).
        bias_correction: divide the moments by (1 - beta^t). maximize: ascend instead of descend.
        master_weights: keep fp32 master copies (and fp32 state) of bf16/fp16 parameters.
    """

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True, *,
                 maximize: bool = False, master_weights: bool = False) -> None:
        _check_args(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        maximize=maximize)
        super().__init__(params, defaults, master_weights=master_weights)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = self._zero_step(p)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)

    def _launch(self, group: dict[str, Any], bucket: Bucket, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        ops.fused_lamb_(bucket.params, bucket.grads, bucket.states["exp_avg"], bucket.states["exp_avg_sq"],
                        bucket.steps, bucket.masters, lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                        weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                        bias_correction=bool(group["bias_correction"]), maximize=bool(group["maximize"]),
                        grad_scale=grad_scale, found_inf=found_inf)


class LAMBReference(LAMB):
    """LAMB whose step runs :func:`lamb_ref` (plain PyTorch): the reference the tests compare against."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._init_state(group, p, self.state[p])
            beta1, beta2 = group["betas"]
            lamb_ref(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                     [self.state[p]["exp_avg_sq"] for p in params], [self.state[p]["step"] for p in params],
                     lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                     eps=group["eps"], bias_correction=group["bias_correction"], maximize=group["maximize"])
        return loss
