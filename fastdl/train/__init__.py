"""Training building blocks: settings, LR schedules, losses, metrics and init helpers."""

from fastdl.train import losses, metrics, schedules
from fastdl.train.config import ConfigError, TrainConfig
from fastdl.train.init import init_weights
from fastdl.train.schedules import Schedule

__all__ = ["TrainConfig", "ConfigError", "Schedule", "init_weights", "losses", "metrics", "schedules"]
