"""Models built from fastdl.nn: one readable file per architecture, each with a dataclass config."""

from fastdl.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
