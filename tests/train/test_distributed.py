"""DDP on CPU: two gloo processes under torchrun take the same steps as one process with the same
global batch, end with identical parameters on both ranks, and reduce the metrics over all ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PER_RANK_BATCH = 4
# 48 training samples: 6 global batches of 8 per epoch, so 8 steps cross an epoch boundary. The 21
# evaluation samples split 11 / 10 over the ranks: no padding, every sample counted once.
SETTINGS = dict(steps=8, lr=0.05, warmup_steps=2, eval_every=4, progress=False, log_every=2, seed=0)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def torchrun(args: list[str], out: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    proc = subprocess.run([*command, "--standalone", "--nproc_per_node", "2", *args], env=env, cwd=out,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def test_ddp_matches_a_single_process_run_with_the_same_global_batch(tmp_path):
    from fastdl.train import Trainer, losses, seed_everything
    from fastdl.train.metrics import Accuracy

    from .helpers import TinyNet, loaders

    torchrun([str(HERE / "ddp_worker.py"), str(tmp_path)], tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == 2
    for name in rank0["params"]:  # DDP: every rank took the same (all-reduced) steps
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    assert rank0["metrics"] == rank1["metrics"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json", "curves.png",
                                                                    "log.csv"]  # written by rank 0 only

    seed_everything(0)
    train, eval_loader = loaders(batch_size=2 * PER_RANK_BATCH)
    single = Trainer(TinyNet(), losses.cross_entropy, train, eval_loader, metrics={"accuracy": Accuracy()},
                     **SETTINGS)
    result = single.fit()
    for name, p in single.module.state_dict().items():
        # Same samples per step; only the order of the floating-point sums differs.
        torch.testing.assert_close(rank0["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert rank0["metrics"]["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert rank0["metrics"]["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)


def test_the_cli_trains_a_recipe_under_torchrun(tmp_path):
    proc = torchrun(["-m", "fastdl", "train", "mlp-digits", "--steps", "4", "--set", "eval_every=2",
                     "--set", "digits_source=procedural", "--no-progress", "--out", str(tmp_path / "run")], tmp_path)
    assert proc.stdout.count("mlp-digits: step 4") == 1  # printed by rank 0 only
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
