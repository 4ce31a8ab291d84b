"""Loading a trained language model and its tokenizer for generation: a checkpoint written by
``fastdl train gpt-chars`` (or any trainer checkpoint whose meta names that recipe, its options and
the character vocabulary)."""

from __future__ import annotations

import os

import torch

from fastdl.data.text import CharTokenizer
from fastdl.models.gpt import GPT, GPTConfig
from fastdl.train import checkpoint as ckpt

__all__ = ["load_char_gpt"]

_GPT_OPTIONS = ("block_size", "n_layer", "n_embd", "n_head", "n_kv_head")


def load_char_gpt(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT of a ``gpt-chars`` checkpoint, in eval mode on device, and its CharTokenizer. Raises
    :class:`fastdl.train.checkpoint.CheckpointError` naming what is missing for anything else."""
    state = ckpt.load(path)
    meta = state.get("meta", {})
    recipe, options, vocab = meta.get("recipe"), meta.get("options"), meta.get("vocab")
    if recipe != "gpt-chars" or not isinstance(options, dict) or not isinstance(vocab, str):
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} is not a gpt-chars model (recipe {recipe!r}); "
                                   "fastdl generate needs the recipe's options and character vocabulary in its meta")
    missing = [key for key in _GPT_OPTIONS if key not in options]
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} lacks the model options {missing}")
    tokenizer = CharTokenizer(vocab)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **{key: options[key] for key in _GPT_OPTIONS})
    model = GPT(config)
    ckpt.check_signature(state["signature"], ckpt.model_signature(model.state_dict()), path,
                         state.get("model_class"), type(model).__qualname__)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer
