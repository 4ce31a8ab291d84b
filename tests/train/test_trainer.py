"""The training loop: learning, accumulation, clipping, penalties, precision, bad steps, early stopping, logs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.data import DataLoader

from fastdl.train import ConfigError, Trainer, TrainingDivergedError, losses, seed_everything
from fastdl.train.metrics import Accuracy

from .helpers import TinyNet, assert_same_params, blobs, loaders, params_of

QUIET = dict(progress=False, log_every=1)


def make(train=None, eval_loader=None, metrics=None, **settings) -> Trainer:
    seed_everything(0)
    model = TinyNet()
    if train is None:
        train, default_eval = loaders()
        eval_loader = eval_loader if eval_loader is not None else default_eval
    return Trainer(model, losses.cross_entropy, train, eval_loader, metrics=metrics, **{**QUIET, **settings})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_loss_falls(precision, tmp_path):
    trainer = make(steps=30, lr=0.05, eval_every=15, precision=precision, metrics={"accuracy": Accuracy()},
                   out_dir=tmp_path)
    result = trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.5 * first, (first, last)
    assert result.metrics["eval_accuracy"] > 0.8
    assert result.skipped_steps == 0


def test_outputs_log_plot_config_and_checkpoint(tmp_path):
    result = make(steps=6, eval_every=3, log_every=2, metrics={"accuracy": Accuracy()}, out_dir=tmp_path).fit()
    assert set(result.files) == {"checkpoint", "log", "plot"}
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert list(rows[0]) == ["step", "epoch", "train_loss", "lr", "grad_norm", "throughput", "skipped_steps",
                             "eval_loss", "eval_accuracy"]
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]  # logged steps and evaluated steps
    assert rows[1]["train_loss"] == "" and rows[1]["eval_loss"] != ""
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6


def test_logged_learning_rate_follows_warmup_cosine(tmp_path):
    make(steps=10, lr=0.1, warmup_steps=4, min_lr=0.01, out_dir=tmp_path).fit()
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "log.csv"))]
    expected = [0.025, 0.05, 0.075, 0.1] + [0.01 + 0.09 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / 6)).item())
                                            for t in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    dataset = blobs(16)
    one = make(DataLoader(dataset, batch_size=8, shuffle=False), steps=2, optimizer="sgd", momentum=0.0, lr=0.1,
               schedule="constant")
    accumulated = make(DataLoader(dataset, batch_size=4, shuffle=False), steps=2, optimizer="sgd", momentum=0.0,
                       lr=0.1, schedule="constant", grad_accum_steps=2)
    one.fit()
    accumulated.fit()
    for name, p in params_of(one.model).items():
        torch.testing.assert_close(params_of(accumulated.model)[name], p, rtol=1e-6, atol=1e-7)


def sgd_step_delta(**settings) -> tuple[dict, dict]:
    trainer = make(steps=1, optimizer="sgd", momentum=0.0, lr=1.0, schedule="constant", **settings)
    before = params_of(trainer.model)
    trainer.fit()
    return before, params_of(trainer.model)


def test_clip_grad_norm_bounds_the_update():
    before, after = sgd_step_delta(clip_grad_norm=0.01)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(after[k] - before[k]) for k in before]))
    assert norm.item() == pytest.approx(0.01, rel=1e-4)  # the raw gradient norm is ~1: clipping was active


def test_clip_grad_value_bounds_each_element():
    before, after = sgd_step_delta(clip_grad_value=1e-3)
    biggest = max((after[k] - before[k]).abs().max().item() for k in before)
    assert biggest == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_penalty_adds_its_gradient_to_the_weights_only(penalty):
    plain_before, plain_after = sgd_step_delta()
    before, after = sgd_step_delta(penalty=penalty, penalty_weight=0.5)
    for name in before:
        extra = (after[name] - before[name]) - (plain_after[name] - plain_before[name])
        if name.endswith("weight"):  # lr 1: the step moves by -0.5 * sign(w) or -0.5 * 2w more
            expected = -0.5 * (torch.sign(before[name]) if penalty == "l1" else 2 * before[name])
            torch.testing.assert_close(extra, expected, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(extra, torch.zeros_like(extra), rtol=0, atol=1e-6)


def nan_grads_from(trainer: Trainer, first_bad_step: int, last_bad_step: int = 10**9) -> None:
    """Poisons the gradient of fc1.weight during steps first..last (1-based)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if first_bad_step <= trainer.step + 1 <= last_bad_step else grad

    trainer.module.fc1.weight.register_hook(hook)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_gradients_are_skipped_and_stop_the_run_after_max_bad_steps(precision, capsys):
    reference = make(steps=4, precision=precision, schedule="constant")
    reference.fit()

    trainer = make(steps=20, precision=precision, schedule="constant", max_bad_steps=3)
    nan_grads_from(trainer, first_bad_step=5)
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps had non-finite"):
        trainer.fit()
    assert trainer.step == 7 and trainer.skipped_steps == 3
    # The skipped steps changed nothing: the parameters are those after step 4.
    assert_same_params(params_of(trainer.model), params_of(reference.model))
    assert "step 5: non-finite gradients" in capsys.readouterr().err


def test_an_isolated_bad_step_is_skipped_and_training_goes_on(tmp_path):
    trainer = make(steps=8, max_bad_steps=2, out_dir=tmp_path)
    nan_grads_from(trainer, first_bad_step=3, last_bad_step=3)
    result = trainer.fit()
    assert result.step == 8 and result.skipped_steps == 1
    skipped = [int(r["skipped_steps"]) for r in csv.DictReader(open(tmp_path / "log.csv"))]
    assert skipped == [0, 0, 1, 1, 1, 1, 1, 1]


def test_early_stopping_after_patience_evaluations_without_improvement():
    trainer = make(steps=50, lr=0.0, eval_every=2, patience=2, monitor="eval_accuracy",
                   metrics={"accuracy": Accuracy()})
    result = trainer.fit()
    # lr 0: nothing improves after the first evaluation (step 2); evaluations at 4 and 6 use up the patience.
    assert result.stop_reason == "early_stopping" and result.step == 6


def test_settings_that_cannot_work_fail_at_construction():
    train, eval_loader = loaders()
    with pytest.raises(ConfigError, match="choose one of eval_loss, eval_accuracy"):
        Trainer(TinyNet(), losses.cross_entropy, train, eval_loader, metrics={"accuracy": Accuracy()},
                monitor="eval_f1")
    with pytest.raises(ConfigError, match="needs an evaluation loader"):
        Trainer(TinyNet(), losses.cross_entropy, train, patience=3)
    with pytest.raises(ConfigError, match="did you mean 'clip_grad_norm'"):
        Trainer(TinyNet(), losses.cross_entropy, train, clip_grad_nrom=1.0)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        Trainer(TinyNet(), losses.cross_entropy, train, optimizer="adamwx")
    with pytest.raises(ConfigError, match="precision must be one of"):
        Trainer(TinyNet(), losses.cross_entropy, train, precision="fp8")


def test_init_scheme_by_name_and_torch_optimizers():
    trainer = make(init="lecun_normal", optimizer="torch.adamw", steps=3)
    assert type(trainer.optimizer) is torch.optim.AdamW
    assert torch.count_nonzero(trainer.module.fc1.bias) == 0  # init zeroed it; no step has run yet
    trainer.fit()


def test_tensorboard_gets_the_logged_scalars_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def close(self):
            written.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    make(steps=2, eval_every=2, out_dir=tmp_path).fit()
    assert written[0] == ("dir", str(tmp_path / "tensorboard"))
    assert ("train_loss", 2) in written and ("eval_loss", 2) in written and written[-1] == ("closed", None)


def test_a_diverging_run_stops_with_a_message_from_the_cli(tmp_path, capsys):
    from fastdl.cli import main

    # lr 1e30: the first Adam step sends the weights to ~1e30, the next forward overflows.
    status = main(["train", "--steps", "50", "--set", "lr=1e30", "--set", "max_bad_steps=3", "--set", "warmup_steps=0",
                   "--out", str(tmp_path), "--no-progress"])
    assert status == 1
    assert "3 consecutive steps had non-finite (inf/NaN) gradients" in capsys.readouterr().err


def test_a_second_fit_continues_instead_of_starting_over(tmp_path):
    trainer = make(steps=4, out_dir=tmp_path)
    trainer.fit()
    params = params_of(trainer.model)
    result = trainer.fit()  # nothing left to do: same parameters, the log keeps its rows
    assert result.step == 4
    assert_same_params(params_of(trainer.model), params)
    assert len(list(csv.DictReader(open(tmp_path / "log.csv")))) == 4


def test_one_seed_makes_a_cpu_run_reproducible():
    def run(seed: int) -> dict:
        seed_everything(seed)
        train, eval_loader = loaders()
        trainer = Trainer(TinyNet(dropout=0.3), losses.cross_entropy, train, eval_loader, steps=6, seed=seed,
                          **QUIET)
        trainer.fit()
        return params_of(trainer.model)

    assert_same_params(run(7), run(7))
    with pytest.raises(AssertionError):
        assert_same_params(run(7), run(8))
