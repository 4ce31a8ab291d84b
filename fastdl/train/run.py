"""Running a recipe end to end: what ``fastdl train`` does, callable from Python.

Settings come from, in increasing priority: the recipe's defaults, ``overrides`` (a config file,
``--set`` pairs and flags, merged by the CLI). Everything that can be wrong with them (an unknown
recipe or key, a bad value, an unwritable output directory, a checkpoint of another recipe or model)
raises :class:`ConfigError` / :class:`CheckpointError` before the first training step.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fastdl.train import checkpoint as ckpt
from fastdl.train import distributed
from fastdl.train.config import ConfigError, TrainConfig, apply_overrides, to_dict
from fastdl.train.recipes import DEFAULT_RECIPE, Recipe, RecipeEnv, get_recipe
from fastdl.train.trainer import CHECKPOINT_NAME, Trainer, TrainResult


@dataclass
class RunSettings:
    recipe: Recipe
    train: TrainConfig
    options: Any          # the recipe's options dataclass


def resolve_settings(recipe_name: str | None, overrides: Mapping[str, Any] | None = None) -> RunSettings:
    """The recipe and its settings with ``overrides`` applied, each key routed to TrainConfig or to the
    recipe's options; an unknown key is an error that lists both."""
    overrides = dict(overrides or {})
    named_in_file = overrides.pop("recipe", None)
    if named_in_file is not None and recipe_name is not None and named_in_file != recipe_name:
        raise ConfigError(f"the config names recipe {named_in_file!r}, the command line {recipe_name!r}")
    recipe = get_recipe(recipe_name or named_in_file or DEFAULT_RECIPE)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    option_keys = {f.name for f in dataclasses.fields(recipe.options)}
    for key in overrides:
        if key not in train_keys and key not in option_keys:
            close = difflib.get_close_matches(key, train_keys | option_keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r} for recipe {recipe.name!r}{hint} Recipe options: "
                              f"{', '.join(sorted(option_keys))}; trainer settings: see fastdl.train.TrainConfig")
    where = f"recipe {recipe.name!r}"
    train = apply_overrides(recipe.train, {k: v for k, v in overrides.items() if k in train_keys}, where)
    options = apply_overrides(recipe.options(), {k: v for k, v in overrides.items() if k in option_keys}, where)
    return RunSettings(recipe, train, options)


def default_out_dir(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out_dir: Path) -> None:
    """Creates ``out_dir`` and proves it writable, or raises ConfigError saying why not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"output directory {str(out_dir)!r} is not writable: {error.strerror or error}") from None


def run_recipe(recipe_name: str | None = None, overrides: Mapping[str, Any] | None = None, *,
               out_dir: str | os.PathLike | None = None, resume: bool | str | os.PathLike = False
               ) -> tuple[TrainResult, RunSettings, str]:
    """Trains ``recipe_name`` (default: :data:`DEFAULT_RECIPE`); returns (result, settings, final metric name).

    ``resume=True`` continues from ``out_dir``'s checkpoint, a path from that file. Without it an
    ``out_dir`` that already holds a checkpoint is an error, so a finished run is never overwritten.
    """
    settings = resolve_settings(recipe_name, overrides)
    recipe, train = settings.recipe, settings.train
    out = Path(out_dir) if out_dir is not None else default_out_dir(recipe.name)
    dist_env = distributed.env()
    if dist_env.is_main:
        check_out_dir(out)
    resume_path: Path | None = None
    if resume:
        resume_path = out / CHECKPOINT_NAME if resume is True else Path(resume)
    elif (out / CHECKPOINT_NAME).exists():
        raise ConfigError(f"{out} already holds a checkpoint; resume it with --resume, or choose another --out")
    saved = None
    if resume_path is not None:
        saved = ckpt.load(resume_path)
        saved_recipe = saved.get("meta", {}).get("recipe")
        if saved_recipe != recipe.name:
            raise ckpt.CheckpointError(f"checkpoint {str(resume_path)!r} was written by recipe {saved_recipe!r}, "
                                       f"not {recipe.name!r}")

    device_type = "cuda" if train.device.startswith("cuda") or (train.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {train.device!r}: torch sees no CUDA device (torch {torch.__version__}); use cpu")
    dist_env = distributed.setup(device_type)
    ckpt.seed_everything(train.seed)
    env = RecipeEnv(device=torch.device(device_type), rank=dist_env.rank, world_size=dist_env.world_size,
                    train=train)
    try:
        parts = recipe.build(settings.options, env)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"recipe {recipe.name!r}: {error}") from error
    meta = {"recipe": recipe.name, "options": to_dict(settings.options), **parts.meta}
    trainer = Trainer(parts.model, parts.loss_fn, parts.train_loader, parts.eval_loader, config=train,
                      metrics=parts.metrics, out_dir=out, meta=meta)
    if saved is not None:
        trainer.check_checkpoint(saved, path=resume_path)
    result = trainer.fit(resume_from=saved)
    if parts.sample is not None and dist_env.is_main:
        result.sample = parts.sample(parts.model)
    return result, settings, parts.final_metric
