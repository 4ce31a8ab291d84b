"""The training loop: a model, a loss and data loaders in; a trained model, a checkpoint, a log and a
plot out.

    trainer = Trainer(model, losses.cross_entropy, train_loader, eval_loader,
                      metrics={"accuracy": Accuracy()}, steps=2000, lr=3e-3, out_dir="runs/mlp")
    result = trainer.fit()                       # or fit(resume_from="runs/mlp/checkpoint.pt")

Batches are ``(inputs, targets)``: ``model(inputs)`` (``model(*inputs)`` for a tuple) gives the outputs
and ``loss_fn(outputs, targets)`` a scalar. One optimizer step is ``grad_accum_steps`` micro-batches;
``steps`` counts optimizer steps, and the learning-rate schedule is a function of that count.

Reproducibility. ``fit()`` seeds python, numpy and torch with ``seed + rank`` and owns the data order:
a map-style loader's sampler is replaced by a seeded, resumable DistributedSampler (shuffled if the
original shuffled), also in a single process, so the order depends on (seed, epoch) only. A
checkpoint holds the model, optimizer, scheduler, GradScaler, every rank's RNG states and the
position in the data (epoch, batches consumed), so resuming continues the uninterrupted run; on the
CPU bit for bit. Loaders with a custom sampler or an IterableDataset are used as they are (single
process only) and are fast-forwarded by drawing and dropping batches on resume.

Mixed precision. ``bf16`` runs forward and loss under ``torch.autocast``; ``fp16`` also scales the
loss with ``torch.amp.GradScaler``, which hands its scale and inf flag to fastdl's fused optimizer
(the kernel unscales on the fly and skips a step whose gradients are not finite). In every precision
a step with inf/NaN gradients is skipped (parameters and optimizer state untouched), reported, and
counted; ``max_bad_steps`` of them in a row stop the run with :class:`TrainingDivergedError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

import fastdl
from fastdl import optim as fastdl_optim
from fastdl.train import checkpoint as ckpt
from fastdl.train import distributed
from fastdl.train.config import ConfigError, TrainConfig, apply_overrides, to_dict
from fastdl.train.init import init_weights
from fastdl.train.metrics import Metric
from fastdl.train.runlog import RunLog, plot_log
from fastdl.train.schedules import Schedule

LossFn = Callable[[Any, Any], Tensor]

OPTIMIZERS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW",
              "adamax": "Adamax", "nadam": "NAdam", "lamb": "LAMB"}
_BETAS = ("adam", "adamw", "adamax", "nadam", "lamb")
_MOMENTUM = ("sgd", "rmsprop")
CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had non-finite gradients."""


def primary_output(outputs: Any) -> Tensor:
    """What metrics see: the outputs, or the first element when the model returns a tuple (GPT's
    (logits, loss), Hugging Face's ModelOutput order). The loss function always gets the outputs whole."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


@dataclass
class TrainResult:
    step: int                     # optimizer steps done (including skipped ones)
    stop_reason: str              # "completed" or "early_stopping"
    metrics: dict[str, float]     # the last evaluation: eval_loss, eval_<metric>
    train_loss: float             # mean training loss over the last logging interval
    best: float | None            # best value of the monitored metric
    skipped_steps: int            # steps skipped for non-finite gradients
    files: dict[str, Path] = field(default_factory=dict)  # checkpoint, log, plot (rank 0, with out_dir)
    sample: str | None = None     # what the recipe generated from the trained model, if it generates


def build_optimizer(model: nn.Module, config: TrainConfig, fsdp: bool = False) -> torch.optim.Optimizer:
    """``config.optimizer`` over the model's trainable parameters; weight decay on dim >= 2 only, and not on
    parameters marked ``_no_weight_decay``.

    Names are fastdl.optim's (``adamw``) or torch.optim's with a ``torch.`` prefix (``torch.adamw``).
    Under FSDP2 the parameters are DTensors, which the fused kernels do not take: torch's class is used.
    """
    name = config.optimizer.lower()
    use_torch = name.startswith("torch.") or fsdp
    base = name.removeprefix("torch.")
    if base not in OPTIMIZERS or (use_torch and base == "lamb"):
        choices = list(OPTIMIZERS) + [f"torch.{n}" for n in OPTIMIZERS if n != "lamb"]
        raise ConfigError(f"optimizer must be one of {', '.join(choices)}, got {config.optimizer!r}")
    cls = getattr(torch.optim if use_torch else fastdl_optim, OPTIMIZERS[base])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    # Parameters marked _no_weight_decay (Mamba's A_log and D, as mamba-ssm marks them) are not decayed either.
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, "_no_weight_decay", False)]
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, config.weight_decay), (no_decay, 0.0)) if g]
    kwargs: dict[str, Any] = {"lr": config.lr}
    if base in _BETAS:
        kwargs["betas"] = tuple(config.betas)
    if base in _MOMENTUM:
        kwargs["momentum"] = config.momentum
    return cls(groups, **kwargs)


class _ResumableSampler(DistributedSampler):
    """DistributedSampler (its permutation depends on seed and epoch only, not on the world size)
    that can start an epoch part-way: ``start`` indices of this rank's share are skipped."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


class _ShardSampler(torch.utils.data.Sampler):
    """Evaluation: rank r takes items r, r + N, r + 2N, ... No padding, so every item counts once in
    the metrics summed over ranks (unlike DistributedSampler, which repeats items to even out)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Loader:
    """A user's DataLoader, with the sampler the trainer controls (see the module docstring)."""

    def __init__(self, loader: DataLoader, *, train: bool, dist_env: distributed.DistEnv, seed: int,
                 pad_eval: bool = False):
        self.seed = seed
        self.sampler: _ResumableSampler | None = None
        sampler = loader.sampler
        standard = (isinstance(sampler, (SequentialSampler, DistributedSampler))
                    or (type(sampler) is RandomSampler and not sampler.replacement
                        and sampler.num_samples == len(sampler.data_source)))
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None or not standard:
            if dist_env.enabled:
                raise ConfigError("distributed training needs DataLoaders over map-style datasets with the default "
                                  "sampler (shuffle=True/False) and batch_size; this one has a custom sampler, "
                                  "batch_sampler or an IterableDataset")
            self.loader, self.batch_size = loader, None
            return
        shuffle = sampler.shuffle if isinstance(sampler, DistributedSampler) else isinstance(sampler, RandomSampler)
        if train or pad_eval:
            new_sampler = self.sampler = _ResumableSampler(loader.dataset, dist_env.world_size, dist_env.rank,
                                                           shuffle=shuffle and train, seed=seed)
        else:
            new_sampler = _ShardSampler(len(loader.dataset), dist_env.rank, dist_env.world_size)
        self.batch_size = loader.batch_size
        # Our own generator: a DataLoader without one draws its worker seed from the global torch RNG
        # every time an epoch starts, which would make the training RNG depend on epoch boundaries.
        self.generator = torch.Generator()
        self.loader = DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=new_sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=self.generator,
            persistent_workers=loader.persistent_workers,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None)

    def iterate(self, epoch: int, skip_batches: int) -> Iterator[Any]:
        if self.batch_size is None:  # a loader we do not control: fast-forward by drawing batches
            iterator = iter(self.loader)
            for _ in range(skip_batches):
                next(iterator)
            return iterator
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.start = skip_batches * self.batch_size
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return iter(self.loader)


def _batch_parts(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"the trainer expects batches of (inputs, targets); got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    return batch[0], batch[1]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _resolve_device(name: str, dist_env: distributed.DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA device (torch {torch.__version__}); use cpu")
        if device.index is None:
            device = torch.device("cuda", dist_env.local_rank if dist_env.enabled else torch.cuda.current_device())
    return device


def _total_norm(grads: list[Tensor]) -> Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class Trainer:
    """See the module docstring. ``config`` holds every setting (:class:`TrainConfig`); keyword
    ``overrides`` change some of them: ``Trainer(model, loss, loader, steps=100, lr=1e-2)``.

    ``optimizer`` / ``scheduler`` objects replace the ones built from the config (a scheduler must step
    once per optimizer step); ``optimizer="sgd"`` (a string) is the config setting. ``metrics`` maps
    names to :class:`fastdl.train.metrics.Metric` accumulators, logged as ``eval_<name>``. ``meta`` is
    saved in checkpoints and ``config.json`` (e.g. the recipe name, a tokenizer's vocabulary). Without
    ``out_dir`` nothing is written.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, train_loader: DataLoader,
                 eval_loader: DataLoader | None = None, *, config: TrainConfig | None = None,
                 metrics: Mapping[str, Metric] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, out_dir: str | Path | None = None,
                 meta: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        if isinstance(optimizer, str):  # the TrainConfig setting (a name), not an optimizer object
            overrides["optimizer"], optimizer = optimizer, None
        cfg = apply_overrides(config or TrainConfig(), overrides, "Trainer") if overrides else (config or TrainConfig())
        self.config = cfg
        self.loss_fn = loss_fn
        self.metrics = dict(metrics or {})
        self.meta = dict(meta or {})
        self.out_dir = Path(out_dir) if out_dir is not None else None

        self.dist = distributed.env()
        self.device = _resolve_device(cfg.device, self.dist)
        self.dist = distributed.setup(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self._check_precision()
        self._check_monitor(eval_loader)

        if cfg.init is not None:
            try:
                init_weights(model, cfg.init)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        self.module = model.to(self.device)  # the bare model: evaluation, state dicts
        self.model = distributed.wrap(model, cfg.distributed, self.device)
        self.fsdp = distributed.is_fsdp(self.model)
        if self.fsdp:
            self.module = self.model
        uses_fastdl_kernels = optimizer is None and not self.fsdp and not cfg.optimizer.lower().startswith("torch.")
        if uses_fastdl_kernels and self.device.type == "cuda" and not fastdl.build_info()["cuda"]:
            raise ConfigError(f"optimizer {cfg.optimizer!r} runs fastdl's kernels, and this fastdl build has no CUDA "
                              f"kernels; rebuild with CUDA or use optimizer 'torch.{cfg.optimizer.lower()}'")
        self.optimizer = optimizer or build_optimizer(self.model, cfg, fsdp=self.fsdp)
        self.schedule = Schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr, cfg.decay_every,
                                 cfg.decay_factor)
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._penalized = [p for p in self._params if p.dim() >= 2]

        self.train_data = _Loader(train_loader, train=True, dist_env=self.dist, seed=cfg.seed)
        self.eval_data = (_Loader(eval_loader, train=False, dist_env=self.dist, seed=cfg.seed, pad_eval=self.fsdp)
                          if eval_loader is not None else None)

        # Progress: everything a checkpoint must carry besides the state dicts.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: float | None = None
        self.evals_since_best = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self._iterator: Iterator[Any] | None = None
        self._last_metrics: dict[str, float] = {}
        self._bar = None

    # ------------------------------------------------------------------ checks

    def _check_precision(self) -> None:
        if self.config.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision bf16: {torch.cuda.get_device_name(self.device)} has no bf16 support; "
                              f"use fp16 or fp32")

    def _check_monitor(self, eval_loader: DataLoader | None) -> None:
        cfg = self.config
        if eval_loader is None:
            if cfg.patience is not None:
                raise ConfigError("early stopping (patience) needs an evaluation loader")
            return
        names = ["eval_loss"] + [f"eval_{name}" for name in self.metrics]
        if cfg.monitor not in names:
            raise ConfigError(f"monitor {cfg.monitor!r} is not an evaluation metric of this run; "
                              f"choose one of {', '.join(names)}")
        if cfg.monitor_mode != "auto":
            self._mode = cfg.monitor_mode
        elif cfg.monitor.endswith(("loss", "perplexity")):
            self._mode = "min"
        else:
            self._mode = "max" if self.metrics[cfg.monitor.removeprefix("eval_")].higher_is_better else "min"

    # ------------------------------------------------------------------ one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _next_batch(self) -> tuple[Any, Any]:
        while True:
            if self._iterator is None:
                self._iterator = self.train_data.iterate(self.epoch, self.batch_in_epoch)
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.batch_in_epoch == 0:
                    raise ValueError("the training loader yields no batches (fewer samples than one batch "
                                     "per rank with drop_last=True?)") from None
                self.epoch += 1
                self.batch_in_epoch = 0
                self._iterator = None
                continue
            self.batch_in_epoch += 1
            inputs, targets = _batch_parts(batch)
            return _to_device(inputs, self.device), _to_device(targets, self.device)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model's outputs for a batch's inputs; override for other calling conventions."""
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)

    def penalty(self) -> Tensor:
        """``penalty_weight`` times the L1 or L2 norm term of the weights (dim >= 2), or 0."""
        cfg = self.config
        if cfg.penalty is None:
            return torch.zeros((), device=self.device)
        if cfg.penalty == "l1":
            total = sum(p.abs().sum() for p in self._penalized)
        else:
            total = sum(p.pow(2).sum() for p in self._penalized)
        return cfg.penalty_weight * total

    def _train_step(self) -> tuple[float, int, float]:
        """One optimizer step over grad_accum_steps micro-batches: (mean loss, targets seen, grad norm).
        A non-finite grad norm means the step was skipped."""
        cfg = self.config
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        items = 0
        for micro in range(cfg.grad_accum_steps):
            inputs, targets = self._next_batch()
            with distributed.gradient_sync(self.model, micro == cfg.grad_accum_steps - 1):
                with self._autocast():
                    outputs = self.forward(self.model, inputs)
                    loss = self.loss_fn(outputs, targets)
                objective = (loss + self.penalty() if cfg.penalty else loss) / cfg.grad_accum_steps
                (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
            loss_sum += loss.detach().float()
            items += targets.numel() if isinstance(targets, Tensor) else len(targets)

        grads = [p.grad for p in self._params if p.grad is not None]
        clipping = cfg.clip_grad_norm is not None or cfg.clip_grad_value is not None
        if self.scaler is not None and clipping:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients; the fused step then does not unscale
        if cfg.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.clip_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        else:
            norm = _total_norm(grads) if grads else torch.zeros((), device=self.device)
        if cfg.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self._params, cfg.clip_grad_value)
        grad_norm = float(norm)
        if self.scaler is not None:
            if not clipping:
                grad_norm /= self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips (in the kernel) when a gradient is inf/NaN
            self.scaler.update()
        elif math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the first step may be a skipped one; the schedule still advances
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step")
            self.scheduler.step()
        return (loss_sum / cfg.grad_accum_steps).item(), items, grad_norm

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the evaluation loader (``eval_batches`` per rank), summed over ranks."""
        if self.eval_data is None:
            return {}
        model = self.module
        was_training = model.training
        model.eval()
        for metric in self.metrics.values():
            metric.reset()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(self.eval_data.iterate(0, 0)):
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            inputs, targets = (_to_device(part, self.device) for part in _batch_parts(batch))
            with self._autocast():
                outputs = self.forward(model, inputs)
                loss = self.loss_fn(outputs, targets)
            n = targets.numel() if isinstance(targets, Tensor) else len(targets)
            loss_sum += loss.double() * n
            count += n
            for metric in self.metrics.values():
                metric.update(primary_output(outputs).float(), targets)
        model.train(was_training)
        # One all-reduce for everything: [loss sum, count, metric states ...].
        parts = [loss_sum.reshape(1).cpu(), count.reshape(1).cpu()] + [m.state for m in self.metrics.values()]
        flat = torch.cat(parts)
        if self.dist.enabled:
            flat = distributed.all_reduce_sum(flat.to(self.device)).cpu()
        total_loss, total_count = flat[0].item(), flat[1].item()
        offset = 2
        for metric in self.metrics.values():
            metric.state = flat[offset: offset + metric.state_size].clone()
            offset += metric.state_size
        results = {"eval_loss": total_loss / total_count if total_count else float("nan")}
        results.update({f"eval_{name}": metric.compute() for name, metric in self.metrics.items()})
        return results

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        if self._mode == "min":
            return value < self.best - self.config.min_delta
        return value > self.best + self.config.min_delta

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs. Collective under DDP/FSDP: call on every rank."""
        model_state = distributed.model_state_dict(self.model)
        return {
            "format": ckpt.FORMAT,
            "step": self.step,
            "data": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "model": model_state,
            "signature": ckpt.model_signature(model_state),
            "model_class": type(self.module).__qualname__,
            "optimizer": distributed.optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": distributed.all_gather_object(ckpt.capture_rng()),
            "progress": {"best": self.best, "evals_since_best": self.evals_since_best, "bad_steps": self.bad_steps,
                         "skipped_steps": self.skipped_steps, "world_size": self.dist.world_size},
            "config": to_dict(self.config),
            "meta": self.meta,
        }

    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Writes the checkpoint (rank 0) atomically; returns its path there, None on other ranks."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint: no path given and the trainer has no out_dir")
            path = self.out_dir / CHECKPOINT_NAME
        state = self.state_dict()
        written = ckpt.atomic_save(state, path) if self.dist.is_main else None
        distributed.barrier()
        return written

    def check_checkpoint(self, checkpoint: str | Path | dict[str, Any], path: str | Path | None = None
                         ) -> dict[str, Any]:
        """Loads the checkpoint (a path, or a dict from :func:`fastdl.train.checkpoint.load` read from
        ``path``) and checks that it fits this run; returns it. Nothing is changed."""
        if isinstance(checkpoint, dict):
            state, path = checkpoint, path or "<checkpoint>"
        else:
            state, path = ckpt.load(checkpoint), checkpoint
        current = ckpt.model_signature(self.module.state_dict()) if not self.fsdp else state["signature"]
        ckpt.check_signature(state["signature"], current, path, state.get("model_class"),
                             type(self.module).__qualname__)
        if (state["scaler"] is None) != (self.scaler is None):
            saved = state["config"]["precision"]
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} was written by a {saved} run; this run is "
                                       f"{self.config.precision} (fp16 runs carry loss-scaler state, others do not)")
        return state

    def load_checkpoint(self, checkpoint: str | Path | dict[str, Any]) -> None:
        """Restores everything :meth:`state_dict` saved; the next step continues the saved run."""
        state = self.check_checkpoint(checkpoint)
        distributed.load_model_state_dict(self.model, state["model"])
        distributed.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = state["data"]["epoch"], state["data"]["batch_in_epoch"]
        progress = state["progress"]
        self.best, self.evals_since_best = progress["best"], progress["evals_since_best"]
        self.bad_steps, self.skipped_steps = progress["bad_steps"], progress["skipped_steps"]
        self._iterator = None
        if state["config"]["steps"] != self.config.steps:
            self._say(f"resuming a run of {state['config']['steps']} steps with steps={self.config.steps}: the "
                      f"learning-rate schedule is the checkpoint's, so steps past its end run at its final rate")
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            ckpt.restore_rng(rng[self.dist.rank])
        else:
            self._say(f"checkpoint was written by {len(rng)} processes, this run has {self.dist.world_size}: "
                      f"random states are re-seeded, so the run will not repeat the original exactly")
            ckpt.seed_everything(self.config.seed + self.dist.rank + self.step)

    # ------------------------------------------------------------------ the loop

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def fit(self, resume_from: str | Path | dict[str, Any] | None = None) -> TrainResult:
        """Trains to ``config.steps`` (or an early stop) and returns the outcome. ``resume_from``: a
        checkpoint of this run (path or loaded dict) to continue from."""
        from tqdm.auto import tqdm

        cfg = self.config
        continuing = resume_from is not None or self.step > 0  # a second fit() continues the first
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif not continuing:
            ckpt.seed_everything(cfg.seed + self.dist.rank)
        main = self.dist.is_main
        files: dict[str, Path] = {}
        if self.out_dir is not None and main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps({"train": to_dict(cfg), "meta": self.meta}, indent=2)
                                                      + "\n")
        eval_columns = (["eval_loss"] + [f"eval_{name}" for name in self.metrics]) if self.eval_data else []
        log = RunLog(self.out_dir, eval_columns, enabled=main, resume_step=self.step if continuing else None)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        stop_reason = "completed"
        interval_loss, interval_steps, interval_items, interval_start = 0.0, 0, 0, time.perf_counter()
        train_loss = float("nan")
        try:
            while self.step < cfg.steps:
                lr = self.optimizer.param_groups[0]["lr"]
                loss, items, grad_norm = self._train_step()
                self.step += 1
                step = self.step
                if math.isfinite(grad_norm):
                    self.bad_steps = 0
                else:
                    self.bad_steps += 1
                    self.skipped_steps += 1
                    self._say(f"step {step}: non-finite gradients (loss {loss:.4g}); step skipped "
                              f"({self.bad_steps} in a row, {self.skipped_steps} in all)")
                if math.isfinite(loss):
                    interval_loss += loss
                    interval_steps += 1
                interval_items += items
                last = step == cfg.steps
                row: dict[str, Any] = {}
                if step % cfg.log_every == 0 or last or self.bad_steps >= cfg.max_bad_steps:
                    stats = torch.tensor([interval_loss, interval_steps, interval_items], dtype=torch.float64)
                    if self.dist.enabled:
                        stats = distributed.all_reduce_sum(stats.to(self.device)).cpu()
                    elapsed = time.perf_counter() - interval_start
                    train_loss = stats[0].item() / stats[1].item() if stats[1] > 0 else float("nan")
                    row.update(epoch=self.epoch, train_loss=train_loss, lr=lr, grad_norm=grad_norm,
                               throughput=stats[2].item() / max(elapsed, 1e-9), skipped_steps=self.skipped_steps)
                    interval_loss, interval_steps, interval_items, interval_start = 0.0, 0, 0, time.perf_counter()
                    bar.set_postfix({"loss": f"{train_loss:.4f}", "lr": f"{lr:.2e}",
                                     f"{cfg.throughput_unit}/s": f"{row['throughput']:.0f}"}, refresh=False)
                if self.bad_steps >= cfg.max_bad_steps:
                    log.write(step, row)
                    path = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None
                    last_good = f"; the last checkpoint is {path}" if path is not None and path.is_file() else ""
                    raise TrainingDivergedError(
                        f"stopped at step {step}: {self.bad_steps} consecutive steps had non-finite (inf/NaN) "
                        f"gradients (max_bad_steps={cfg.max_bad_steps}){last_good}. Lower lr, set clip_grad_norm, "
                        f"or train in bf16/fp32 instead of fp16.")
                evaluated = False
                if self.eval_data is not None and (step % cfg.eval_every == 0 or last):
                    self._last_metrics = self.evaluate()
                    row.update(self._last_metrics)
                    evaluated = True
                    value = self._last_metrics[cfg.monitor]
                    if self._improved(value):
                        self.best, self.evals_since_best = value, 0
                    else:
                        self.evals_since_best += 1
                    if cfg.patience is not None and self.evals_since_best >= cfg.patience:
                        stop_reason = "early_stopping"
                    bar.set_postfix({**{k.removeprefix("eval_"): f"{v:.4g}" for k, v in self._last_metrics.items()},
                                     "lr": f"{lr:.2e}"}, refresh=False)
                if row:
                    log.write(step, row)
                bar.update(1)
                wants_checkpoint = (evaluated if cfg.checkpoint_every is None else step % cfg.checkpoint_every == 0)
                if self.out_dir is not None and (wants_checkpoint or last or stop_reason != "completed"):
                    self.save_checkpoint()
                if stop_reason != "completed":
                    self._say(f"early stopping at step {step}: {cfg.monitor} has not improved on {self.best} "
                              f"for {self.evals_since_best} evaluations (patience {cfg.patience})")
                    break
        finally:
            bar.close()
            log.close()
            if log.enabled:  # also after a divergence: the curves show how it went
                files["log"] = log.csv_path
                files["plot"] = plot_log(log.csv_path, self.out_dir / "curves.png",
                                         title=str(self.meta.get("recipe", "")))
        if main and self.out_dir is not None and (self.out_dir / CHECKPOINT_NAME).is_file():
            files["checkpoint"] = self.out_dir / CHECKPOINT_NAME
        return TrainResult(step=self.step, stop_reason=stop_reason, metrics=dict(self._last_metrics),
                           train_loss=train_loss, best=self.best, skipped_steps=self.skipped_steps, files=files)
