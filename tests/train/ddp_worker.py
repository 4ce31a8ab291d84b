"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: trains TinyNet with DDP (gloo) and
saves this rank's parameters and evaluation metrics to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import TinyNet, loaders  # this script's folder is sys.path[0]
from test_distributed import PER_RANK_BATCH, SETTINGS  # one definition of the run

from fastdl.train import Trainer, losses, seed_everything
from fastdl.train.metrics import Accuracy

out = Path(sys.argv[1])
torch.set_num_threads(1)
seed_everything(0)
train, eval_loader = loaders(batch_size=PER_RANK_BATCH)
trainer = Trainer(TinyNet(), losses.cross_entropy, train, eval_loader, metrics={"accuracy": Accuracy()},
                  out_dir=out / "run", **SETTINGS)
result = trainer.fit()
rank = dist.get_rank()
torch.save({"params": trainer.module.state_dict(), "metrics": result.metrics, "world_size": dist.get_world_size()},
           out / f"rank{rank}.pt")
dist.destroy_process_group()
