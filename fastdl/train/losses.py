"""Loss functions with the trainer's signature ``loss(outputs, targets) -> scalar``.

They are torch.nn.functional's, with one convenience: classification losses take logits of shape
(..., C) and targets of shape (...), so a language model's (B, T, V) logits need no reshape
(F.cross_entropy wants the class dimension second). All reduce by the mean. The arithmetic runs in
fp32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100) -> Tensor:
    """logits (..., C), targets (...) int64 class ids -> mean negative log-likelihood."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} need targets of shape "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           label_smoothing=label_smoothing, ignore_index=ignore_index)


def bce_with_logits(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy on logits; targets are probabilities of the same shape."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.to(torch.float32), pos_weight=pos_weight)


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.mse_loss(outputs.float(), targets.float())


def l1(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.l1_loss(outputs.float(), targets.float())


def huber(outputs: Tensor, targets: Tensor, delta: float = 1.0) -> Tensor:
    """Quadratic for |error| < delta, linear beyond it."""
    return F.huber_loss(outputs.float(), targets.float(), delta=delta)


def kl_divergence(logits: Tensor, target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(target_logits / T) || softmax(logits / T)), summed over classes, averaged over the
    other dimensions (torch's ``reduction="batchmean"`` once the leading dimensions are flattened)."""
    classes = logits.shape[-1]
    log_p = F.log_softmax(logits.reshape(-1, classes).float() / temperature, dim=-1)
    log_q = F.log_softmax(target_logits.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 0.5,
                      temperature: float = 2.0) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015):
    ``alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, where ``_T`` are
    the softmaxes at temperature T. T^2 keeps the soft term's gradients on the scale of the hard
    term's as T grows (they shrink as 1/T^2). ``teacher_logits`` are detached."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation_loss: alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature must be positive, got {temperature}")
    hard = cross_entropy(student_logits, targets)
    soft = kl_divergence(student_logits, teacher_logits.detach(), temperature)
    return alpha * hard + (1.0 - alpha) * temperature**2 * soft


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy, "bce_with_logits": bce_with_logits, "mse": mse, "l1": l1, "huber": huber,
}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(LOSSES)}")
    return LOSSES[name]
