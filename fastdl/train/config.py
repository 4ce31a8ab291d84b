"""The trainer's settings (:class:`TrainConfig`) and the checks that turn a user's config file,
``--set KEY=VALUE`` pairs and flags into validated dataclasses, or into a :class:`ConfigError` that
names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "step", "constant")
DISTRIBUTED = ("ddp", "fsdp")
PENALTIES = ("l1", "l2")


class ConfigError(ValueError):
    """A setting that cannot work, found before any training starts."""


@dataclass
class TrainConfig:
    # Length and optimizer
    steps: int = 1000                       # optimizer steps (each of grad_accum_steps micro-batches)
    optimizer: str = "adamw"                # fastdl.optim class by lower-case name; "torch.adamw" etc. for torch's
    lr: float = 1e-3                        # peak learning rate (after warmup)
    weight_decay: float = 0.0               # applied to parameters with dim >= 2 only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam-family betas
    momentum: float = 0.9                   # SGD / RMSprop momentum
    # Learning-rate schedule: a function of the step, see fastdl.train.schedules
    schedule: str = "cosine"                # cosine | linear | step | constant
    warmup_steps: int = 0                   # linear warmup from lr / warmup_steps to lr
    min_lr: float = 0.0                     # floor of cosine / linear / step decay
    decay_every: int = 1000                 # step decay: multiply by decay_factor every this many steps
    decay_factor: float = 0.1
    # Gradients
    grad_accum_steps: int = 1               # micro-batches per optimizer step
    clip_grad_norm: Optional[float] = None  # clip the global L2 norm of the gradients to this
    clip_grad_value: Optional[float] = None  # clamp each gradient element to [-v, v]
    max_bad_steps: int = 20                 # stop after this many consecutive steps with inf/NaN gradients
    penalty: Optional[str] = None           # "l1" | "l2": add weight * sum|w| or weight * sum w^2 (dim >= 2)
    penalty_weight: float = 0.0
    init: Optional[str] = None              # re-initialise weights by name (see fastdl.train.init), or keep
    # Numerics and placement
    precision: str = "fp32"                 # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)
    device: str = "auto"                    # auto (cuda when available) | cpu | cuda | cuda:N
    distributed: str = "ddp"                # under torchrun: ddp | fsdp (FSDP2 fully_shard, CUDA only)
    seed: int = 0                           # one seed: model init, data order, dropout
    # Evaluation, early stopping, checkpoints, logs
    eval_every: int = 100                   # steps between evaluations (and at the last step)
    eval_batches: Optional[int] = None      # batches per evaluation per rank; None: the whole loader
    monitor: str = "eval_loss"              # metric that early stopping watches
    monitor_mode: str = "auto"              # min | max | auto (min for *loss and *perplexity)
    patience: Optional[int] = None          # stop after this many evaluations without improvement
    min_delta: float = 0.0                  # an improvement must beat the best by more than this
    checkpoint_every: Optional[int] = None  # steps between checkpoints; None: at each evaluation
    log_every: int = 10                     # steps between CSV / TensorBoard rows
    progress: bool = True                   # tqdm progress bar (rank 0)
    throughput_unit: str = "samples"        # what the target elements are: samples, tokens, pixels ...

    def __post_init__(self) -> None:
        validate(self)


def _choice(name: str, value: Any, choices: tuple, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Checks ranges and choices of every field; raises ConfigError naming the first bad one."""
    _choice("precision", config.precision, PRECISIONS)
    _choice("schedule", config.schedule, SCHEDULES)
    _choice("distributed", config.distributed, DISTRIBUTED)
    _choice("penalty", config.penalty, PENALTIES, allow_none=True)
    _choice("monitor_mode", config.monitor_mode, ("auto", "min", "max"))
    for name in ("steps", "grad_accum_steps", "eval_every", "log_every", "max_bad_steps", "decay_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("warmup_steps", "lr", "min_lr", "weight_decay", "penalty_weight", "min_delta", "momentum"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("clip_grad_norm", "clip_grad_value", "eval_batches", "patience", "checkpoint_every"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive or null, got {value}")
    if config.min_lr > config.lr:
        raise ConfigError(f"min_lr ({config.min_lr}) must not exceed lr ({config.lr})")
    if not 0 < config.decay_factor <= 1:
        raise ConfigError(f"decay_factor must be in (0, 1], got {config.decay_factor}")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {config.betas}")
    if config.penalty is not None and config.penalty_weight == 0:
        raise ConfigError(f"penalty {config.penalty!r} needs a positive penalty_weight")
    if config.device != "auto" and not (config.device == "cpu" or config.device.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {config.device!r}")


def _coerce(where: str, key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type the dataclass field declares (JSON/TOML/--set give lists, ints for floats,
    strings for everything); a ConfigError otherwise."""
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} must be {expected}, got {value!r}")

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(where, key, value, inner[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise fail("true or false")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise fail("an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise fail("an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
    if annotation is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if origin is tuple:
        if isinstance(value, str):
            try:
                value = json.loads(value if value.startswith("[") else f"[{value}]")
            except json.JSONDecodeError:
                raise fail("a list") from None
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(where, key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise fail(f"a list of {len(args)}")
        return tuple(_coerce(where, key, v, a) for v, a in zip(value, args))
    return value


def apply_overrides(config: Any, overrides: Mapping[str, Any], where: str) -> Any:
    """A copy of the dataclass ``config`` with ``overrides`` applied, each value coerced to its field's
    type. An unknown key is a ConfigError that lists the valid keys and suggests the closest one."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown setting {key!r}{hint} Valid settings: {', '.join(fields)}")
        changes[key] = _coerce(where, key, value, hints[key])
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except (TypeError, ValueError) as error:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{where}: {error}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of settings from a .json, .toml (Python 3.11+, or with tomli) or .yaml/.yml
    (with PyYAML) file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(f"reading {path.name} needs Python 3.11+ or `pip install tomli`; "
                                      f"or write the config as JSON") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"reading {path.name} needs PyYAML (`pip install pyyaml`); "
                                  f"or write the config as JSON") from None
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path.name}: expected .json, .toml or .yaml, got {suffix or 'no suffix'!r}")
    except ConfigError:
        raise
    except Exception as error:  # JSONDecodeError, TOMLDecodeError, YAMLError
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "hidden_sizes=[64, 64]"]`` -> {"lr": 0.0003, "hidden_sizes": [64, 64]}: each value is
    read as JSON when it parses, else kept as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready plain values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
