"""The run's record: ``log.csv`` (one row per logged step), TensorBoard scalars when TensorBoard is
installed, and ``curves.png`` at the end. Only rank 0 writes; on other ranks every method is a no-op.

Rows have a fixed header: step, epoch, train_loss, lr, grad_norm, throughput, skipped_steps, then
eval_loss and one column per metric; evaluation columns are empty on steps without an evaluation.
A resumed run keeps the rows up to its checkpoint's step and drops the rest (they belong to the
part of the crashed run that the checkpoint does not contain).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

TRAIN_COLUMNS = ["step", "epoch", "train_loss", "lr", "grad_norm", "throughput", "skipped_steps"]


class RunLog:
    def __init__(self, out_dir: Path | None, eval_columns: list[str], enabled: bool, resume_step: int | None = None):
        self.enabled = enabled and out_dir is not None
        self.columns = TRAIN_COLUMNS + eval_columns
        self.csv_path = out_dir / "log.csv" if out_dir is not None else None
        self._file = None
        self._writer = None
        self._tb = None
        if not self.enabled:
            return
        kept = self._rows_up_to(resume_step) if resume_step is not None else []
        tmp = self.csv_path.with_name(".log.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.csv_path)
        self._file = open(self.csv_path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            self._tb = None
        else:
            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step)

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def _rows_up_to(self, step: int) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with open(self.csv_path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) <= step]

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for key, value in values.items():
            row[key] = f"{value:.6g}" if isinstance(value, float) else value
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Each column of a log.csv as (step, value) pairs, skipping empty and non-finite cells."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, cell in row.items():
                if key == "step" or not cell:
                    continue
                value = float(cell)
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    return series


def plot_log(csv_path: Path, png_path: Path, title: str = "") -> Path:
    """Loss curves (train and eval), one panel per evaluation metric, and the learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: leaves the user's backend alone
    from matplotlib.figure import Figure

    series = read_log(csv_path)
    metrics = [k for k in series if k.startswith("eval_") and k != "eval_loss"]
    panels = 2 + len(metrics)
    fig = Figure(figsize=(4.5 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    def draw(ax, key: str, label: str, **style) -> None:
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=label, **style)

    draw(axes[0], "train_loss", "train")
    draw(axes[0], "eval_loss", "eval", marker="o", markersize=3)
    axes[0].set_title("loss")
    axes[0].legend()
    for ax, key in zip(axes[1:], metrics):
        draw(ax, key, key, marker="o", markersize=3, color="tab:green")
        ax.set_title(key.removeprefix("eval_"))
    draw(axes[-1], "lr", "lr", color="tab:orange")
    axes[-1].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(png_path, dpi=100)
    return png_path
