"""Training recipes: a name (``fastdl train NAME``) bound to a function that builds the model, the
loss, the data loaders and the metrics, plus the recipe's default trainer settings.

Adding a recipe is one decorated function, in a new module of this package (every module here is
imported when a recipe is first looked up, so nothing else needs editing):

    # fastdl/train/recipes/gpt_chars.py
    from dataclasses import dataclass
    from fastdl.train.recipes import RecipeEnv, RecipeParts, register_recipe

    @dataclass
    class GPTCharsOptions:             # the recipe's own settings; config files and --set change them
        block_size: int = 128          # characters of context
        n_layer: int = 4
        batch_size: int = 32           # sequences per process and micro-batch

    @register_recipe("gpt-chars", options=GPTCharsOptions, description="GPT on the built-in text corpus",
                     train=TrainConfig(steps=2000, lr=6e-4, warmup_steps=100, throughput_unit="tokens"))
    def gpt_chars(options: GPTCharsOptions, env: RecipeEnv) -> RecipeParts:
        from fastdl.models.gpt import GPT, GPTConfig   # import the model here, not at module level
        tokenizer, train, val = char_lm_datasets(block_size=options.block_size)
        ...
        return RecipeParts(model=GPT(...), loss_fn=losses.cross_entropy,
                           train_loader=DataLoader(train, options.batch_size, shuffle=True),
                           eval_loader=DataLoader(val, options.batch_size), metrics={"perplexity": Perplexity()},
                           meta={"vocab": tokenizer.vocab}, final_metric="eval_perplexity")

The function runs after seeding with the run's seed, so the model's initial weights follow from it.
Option names must differ from TrainConfig's (both live in one flat config namespace); registration
checks this. Recipes whose model is not in this build are simply not registered yet.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdl.train.config import ConfigError, TrainConfig
from fastdl.train.metrics import Metric

DEFAULT_RECIPE = "gpt-chars"


@dataclass(frozen=True)
class RecipeEnv:
    """Where the recipe is being built."""

    device: torch.device      # where the trainer will put the model (it moves it; build on the CPU)
    rank: int                 # this process, 0 .. world_size - 1 (0 without torchrun)
    world_size: int           # processes; each builds its own loaders, the trainer shards them
    train: TrainConfig        # the run's resolved trainer settings (steps, precision, seed, ...)


@dataclass
class RecipeParts:
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    train_loader: DataLoader
    eval_loader: Optional[DataLoader] = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able; saved in checkpoints and config.json
    final_metric: str = "eval_loss"                      # the number `fastdl train` reports at the end
    sample: Optional[Callable[[nn.Module], str]] = None  # text to show after training (language models)


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[Any, RecipeEnv], RecipeParts]
    options: type                # a dataclass of the recipe's settings, all with defaults
    train: TrainConfig           # the recipe's default trainer settings
    description: str


_REGISTRY: dict[str, Recipe] = {}
_discovered = False


def register_recipe(name: str, *, options: type, train: TrainConfig | None = None, description: str = ""
                    ) -> Callable[[Callable[[Any, RecipeEnv], RecipeParts]], Callable[[Any, RecipeEnv], RecipeParts]]:
    """Decorator: registers the function as the recipe ``name`` (see the module docstring)."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"recipe {name!r}: options must be a dataclass, got {options!r}")
    clash = {f.name for f in dataclasses.fields(options)} & {f.name for f in dataclasses.fields(TrainConfig)}
    if clash:
        raise TypeError(f"recipe {name!r}: option names {sorted(clash)} are also TrainConfig settings; rename them")

    def decorator(build: Callable[[Any, RecipeEnv], RecipeParts]) -> Callable[[Any, RecipeEnv], RecipeParts]:
        if name in _REGISTRY:
            raise ValueError(f"two recipes are named {name!r}")
        _REGISTRY[name] = Recipe(name, build, options, train or TrainConfig(),
                                 description or (build.__doc__ or "").strip().split("\n")[0])
        return build

    return decorator


def unregister_recipe(name: str) -> None:
    """Removes a recipe (tests register temporary ones)."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        importlib.import_module(f"{__name__}.{module_info.name}")


def recipe_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ConfigError lists the available ones."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]
