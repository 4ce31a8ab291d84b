"""Checkpoints: resuming repeats the uninterrupted run bit for bit; a crash while saving keeps the last
good checkpoint; a checkpoint of another model is refused before anything changes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from fastdl.train import CheckpointError, Trainer, losses, seed_everything
from fastdl.train import checkpoint as ckpt
from fastdl.train.metrics import Accuracy

from .helpers import TinyNet, assert_same_params, blobs, loaders, params_of

# 40 samples in batches of 8 with 2 micro-batches per step: an epoch ends in the middle of a step,
# so resuming must restore the sampler's epoch and position, not only the step.
SETTINGS = dict(steps=12, grad_accum_steps=2, lr=0.02, warmup_steps=3, eval_every=4, progress=False, log_every=1,
                weight_decay=0.01)


class Crash(Exception):
    pass


def make(out_dir, seed: int = 0, **settings) -> Trainer:
    seed_everything(seed)
    model = TinyNet(dropout=0.2)  # dropout: the torch RNG state must be restored too
    train = DataLoader(blobs(40), batch_size=8, shuffle=True)
    _, eval_loader = loaders()
    return Trainer(model, losses.cross_entropy, train, eval_loader, metrics={"accuracy": Accuracy()},
                   out_dir=out_dir, **{**SETTINGS, **settings})


def crash_during_step(trainer: Trainer, step: int) -> None:
    def hook(module, args):
        if module.training and trainer.step + 1 == step:
            raise Crash(f"simulated crash in step {step}")

    trainer.module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, precision):
    straight = make(tmp_path / "straight", precision=precision)
    straight.fit()

    crashed = make(tmp_path / "resumed", precision=precision)
    crash_during_step(crashed, 11)  # the last checkpoint is step 8's
    with pytest.raises(Crash):
        crashed.fit()
    assert ckpt.load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 8

    # A new process would start from other random states and another initialisation: both are restored.
    resumed = make(tmp_path / "resumed", seed=123, precision=precision)
    torch.manual_seed(999)
    result = resumed.fit(resume_from=tmp_path / "resumed" / "checkpoint.pt")

    assert result.step == 12
    assert_same_params(params_of(resumed.model), params_of(straight.model))
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for index in a:
        for key in a[index]:
            assert torch.equal(a[index][key], b[index][key]), (index, key)
    if precision == "fp16":
        assert resumed.scaler.get_scale() == straight.scaler.get_scale()

    # The resumed log has the straight run's rows (the crashed steps 9-10 were dropped on resume).
    def rows(path):
        return [{k: v for k, v in r.items() if k != "throughput"} for r in csv.DictReader(open(path / "log.csv"))]

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make(tmp_path, steps=8)
    trainer.fit()
    path = tmp_path / "checkpoint.pt"
    good = ckpt.load(path)

    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    trainer.step = 99
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)

    after = ckpt.load(path)
    assert after["step"] == good["step"] == 8
    assert_same_params(after["model"], good["model"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")) == []  # no temp left


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    trainer = make(tmp_path, steps=4)
    trainer.fit()
    before = ckpt.load(tmp_path / "checkpoint.pt")
    # A second process overwrites the checkpoint and is SIGKILLed halfway through writing the file.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fastdl.train import checkpoint as ckpt
        state = ckpt.load({str(tmp_path / "checkpoint.pt")!r})
        state["step"] = 1000

        def save_and_die(obj, f, *args, **kwargs):
            f.write(b"PK\\x03\\x04 torn")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_and_die
        ckpt.atomic_save(state, {str(tmp_path / "checkpoint.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.pt.tmp-")]
    assert len(leftovers) == 1  # the torn temp file, never renamed over the checkpoint
    after = ckpt.load(tmp_path / "checkpoint.pt")
    assert after["step"] == before["step"] == 4
    # and a run resumes from it
    make(tmp_path, steps=6).fit(resume_from=tmp_path / "checkpoint.pt")


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(tmp_path):
    make(tmp_path, steps=2).fit()

    seed_everything(0)
    wider = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    train, _ = loaders()
    other = Trainer(wider, losses.cross_entropy, train, progress=False, steps=4)
    before = params_of(other.model)
    with pytest.raises(CheckpointError, match=r"holds a different model .*TinyNet.*Sequential"):
        other.fit(resume_from=tmp_path / "checkpoint.pt")
    assert other.step == 0
    assert_same_params(params_of(other.model), before)


def test_unreadable_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a fastdl trainer checkpoint"):
        ckpt.load(tmp_path / "weights.pt")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    seed_everything(5)
    ckpt.atomic_save({"rng": ckpt.capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(6)
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
