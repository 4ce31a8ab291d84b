"""Learning-rate schedules against their formulas, and driven through LambdaLR as the trainer does."""

import math

import pytest
import torch

from fastdl.train.config import ConfigError
from fastdl.train.schedules import Schedule, constant_lr, linear_decay_lr, step_decay_lr, warmup_cosine_lr

# lr 1.0, 10 warmup steps, cosine over the next 100 steps down to 0.1.
COSINE_POINTS = [
    (0, 0.1),    # warmup starts at lr / W: step 0 already trains
    (4, 0.5),
    (9, 1.0),    # end of warmup
    (10, 1.0),   # t = 0
    (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # t = 1/4
    (60, 0.55),  # t = 1/2: halfway between lr and min_lr
    (85, 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4))),  # t = 3/4
    (110, 0.1),  # t = 1: the floor
    (500, 0.1),  # and after the end
]


@pytest.mark.parametrize(("step", "expected"), COSINE_POINTS)
def test_warmup_cosine_matches_its_formula(step, expected):
    lr = warmup_cosine_lr(step, lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr == pytest.approx(expected, abs=1e-12)
    schedule = Schedule("cosine", lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert schedule.lr_at(step) == pytest.approx(expected, abs=1e-12)


def test_cosine_without_warmup_starts_at_the_peak():
    assert warmup_cosine_lr(0, lr=3e-4, total_steps=100) == pytest.approx(3e-4)
    assert warmup_cosine_lr(50, lr=3e-4, total_steps=100) == pytest.approx(1.5e-4)


def test_linear_step_and_constant():
    assert linear_decay_lr(0, lr=1.0, total_steps=10) == 1.0
    assert linear_decay_lr(5, lr=1.0, total_steps=10, min_lr=0.2) == pytest.approx(0.6)
    assert linear_decay_lr(10, lr=1.0, total_steps=10, min_lr=0.2) == pytest.approx(0.2)
    assert [step_decay_lr(s, lr=1.0, decay_every=3, decay_factor=0.5) for s in range(7)] == \
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    assert step_decay_lr(100, lr=1.0, decay_every=3, decay_factor=0.5, min_lr=0.01) == 0.01
    assert [constant_lr(s, lr=2.0, warmup_steps=4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("name", ["cosine", "linear", "step", "constant"])
def test_lambda_lr_follows_the_schedule_and_resumes_from_its_state(name):
    schedule = Schedule(name, lr=0.5, total_steps=40, warmup_steps=5, min_lr=0.01, decay_every=7, decay_factor=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr_at(s) for s in range(40)], rel=1e-12)

    # The scheduler's state is plain data (weights_only checkpoints) and restores the position.
    state = scheduler.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, Schedule(name, lr=0.5, total_steps=40))
    scheduler2.load_state_dict(state)
    assert scheduler2.last_epoch == 40 and scheduler2.lr_lambdas[0] == schedule


def test_bad_schedules_are_config_errors():
    with pytest.raises(ConfigError, match="schedule must be one of"):
        Schedule("exponential", lr=1.0, total_steps=10)


def test_a_warmup_longer_than_the_run_ramps_for_the_whole_run():
    schedule = Schedule("cosine", lr=1.0, total_steps=10, warmup_steps=20)
    assert [schedule.lr_at(s) for s in (0, 9)] == pytest.approx([0.05, 0.5])
