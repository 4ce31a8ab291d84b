"""Learning-rate schedules as plain functions of the step, so a schedule can be plotted, tested
against its formula, and resumed from nothing but the step count.

Every schedule starts with an optional linear warmup: at step s < W the rate is ``lr * (s + 1) / W``,
reaching ``lr`` at step W - 1 (step 0 already trains, at lr / W). After warmup, with
``t = (s - W) / (total - W)`` the fraction of the decay done:

    cosine     min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2      (Loshchilov & Hutter 2017, SGDR)
    linear     lr + (min_lr - lr) * t
    step       max(min_lr, lr * decay_factor ** ((s - W) // decay_every))
    constant   lr

and ``min_lr`` from step ``total`` on. A warmup longer than the run ramps up for the whole run
(``fastdl train --steps 10`` on a recipe with 30 warmup steps is a smoke test, not an error).

:class:`Schedule` bundles one of these with its arguments; ``schedule(step)`` is the multiplier of
the peak rate, which is what ``torch.optim.lr_scheduler.LambdaLR`` expects, and
``schedule.lr_at(step)`` the rate itself:

    schedule = Schedule("cosine", lr=3e-4, total_steps=5000, warmup_steps=200, min_lr=3e-5)
    plt.plot([schedule.lr_at(s) for s in range(5000)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastdl.train.config import SCHEDULES, ConfigError


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Fraction of the peak rate during linear warmup: (step + 1) / warmup_steps, then 1."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def _decay_fraction(step: int, warmup_steps: int, total_steps: int) -> float:
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_cosine_lr(step: int, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warmup, then cosine annealing from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    t = _decay_fraction(step, warmup_steps, total_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear_decay_lr(step: int, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warmup, then a straight line from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    return lr + (min_lr - lr) * _decay_fraction(step, warmup_steps, total_steps)


def step_decay_lr(step: int, lr: float, decay_every: int, decay_factor: float = 0.1, warmup_steps: int = 0,
                  min_lr: float = 0.0) -> float:
    """Linear warmup, then ``lr`` multiplied by ``decay_factor`` every ``decay_every`` steps, floored."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    return max(min_lr, lr * decay_factor ** ((step - warmup_steps) // decay_every))


def constant_lr(step: int, lr: float, warmup_steps: int = 0) -> float:
    """Linear warmup, then ``lr``."""
    return lr * warmup_factor(step, warmup_steps)


@dataclass
class Schedule:
    """One named schedule with its arguments. Only plain fields, so ``LambdaLR.state_dict()`` saves
    them with the scheduler (a resumed run continues the checkpoint's schedule)."""

    name: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_every: int = 1000
    decay_factor: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.name!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate at ``step`` (0-based optimizer step)."""
        if self.name == "cosine":
            return warmup_cosine_lr(step, self.lr, self.total_steps, self.warmup_steps, self.min_lr)
        if self.name == "linear":
            return linear_decay_lr(step, self.lr, self.total_steps, self.warmup_steps, self.min_lr)
        if self.name == "step":
            return step_decay_lr(step, self.lr, self.decay_every, self.decay_factor, self.warmup_steps, self.min_lr)
        return constant_lr(step, self.lr, self.warmup_steps)

    def __call__(self, step: int) -> float:
        """The multiplier of the peak rate at ``step``: the ``lr_lambda`` of LambdaLR."""
        return self.lr_at(step) / self.lr if self.lr > 0 else 0.0
