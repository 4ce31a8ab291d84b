"""Models built on fastdl's modules: one readable file per architecture, each with a config dataclass."""

from fastdl.models.gpt import GPT, GPTConfig
from fastdl.models.mamba import MambaConfig, MambaLM
from fastdl.models.mlp import MLP, MLPConfig

__all__ = ["GPT", "GPTConfig", "MLP", "MLPConfig", "MambaConfig", "MambaLM"]
