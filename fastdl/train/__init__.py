"""Training: :class:`Trainer` (fastdl's fused optimizers, gradient accumulation and clipping, LR
schedules, bf16/fp16 mixed precision, evaluation and early stopping, crash-safe resumable checkpoints,
CSV/TensorBoard logs and a plot, DDP/FSDP2 under torchrun), losses, metrics, init helpers, and the
recipes behind ``fastdl train``."""

from fastdl.train import losses, metrics, schedules
from fastdl.train.checkpoint import CheckpointError, seed_everything
from fastdl.train.config import ConfigError, TrainConfig
from fastdl.train.init import init_weights
from fastdl.train.recipes import RecipeEnv, RecipeParts, get_recipe, recipe_names, register_recipe
from fastdl.train.run import run_recipe
from fastdl.train.schedules import Schedule
from fastdl.train.trainer import Trainer, TrainingDivergedError, TrainResult, build_optimizer

__all__ = ["Trainer", "TrainConfig", "TrainResult", "TrainingDivergedError", "ConfigError", "CheckpointError",
           "Schedule", "build_optimizer", "init_weights", "seed_everything", "losses", "metrics", "schedules",
           "RecipeEnv", "RecipeParts", "register_recipe", "get_recipe", "recipe_names", "run_recipe"]
