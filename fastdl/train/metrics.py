"""Evaluation metrics, as functions of one batch and as accumulators over many.

An accumulator keeps its sufficient statistics (counts, sums) in one float64 tensor ``state``; the
statistics of a whole dataset are the sum of those of its parts, so under DDP the trainer sums the
states of all ranks (one all_reduce) and every rank computes the metric of the whole evaluation set.

    metrics = {"accuracy": Accuracy(), "f1_macro": F1(num_classes=10, average="macro")}

Classification metrics take logits (..., C) and targets (...) of class ids, and predict the argmax.
Precision, recall and F1 follow scikit-learn: "micro" pools the counts of all classes (for
single-label data micro precision = recall = F1 = accuracy); "macro" is the unweighted mean over the
classes that occur in the targets or the predictions, with 0 for a class whose ratio is 0/0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

AVERAGES = ("macro", "micro")


def _check_classification(logits: Tensor, targets: Tensor, name: str) -> None:
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")


class Metric:
    """Base class: ``update(outputs, targets)`` per batch, ``compute()`` at the end, ``reset()``."""

    higher_is_better = True
    state_size = 2

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.state = torch.zeros(self.state_size, dtype=torch.float64)

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        self.state += self.batch_state(outputs.detach(), targets.detach()).to(self.state)

    def batch_state(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError


class Accuracy(Metric):
    """Fraction of argmax predictions equal to the target. State: [correct, total]."""

    def batch_state(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_classification(outputs, targets, "Accuracy")
        correct = (outputs.argmax(-1) == targets).sum()
        return torch.stack([correct.double().cpu(), torch.tensor(float(targets.numel()), dtype=torch.float64)])

    def compute(self) -> float:
        correct, total = self.state.tolist()
        return correct / total if total else float("nan")


class _ClassCounts(Metric):
    """State: per class [true positives, false positives, false negatives], flattened (3 * C)."""

    def __init__(self, num_classes: int, average: str = "macro") -> None:
        if average not in AVERAGES:
            raise ValueError(f"{type(self).__name__}: average must be one of {', '.join(AVERAGES)}, got {average!r}")
        if num_classes < 2:
            raise ValueError(f"{type(self).__name__}: num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.average = num_classes, average
        self.state_size = 3 * num_classes
        super().__init__()

    def batch_state(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_classification(outputs, targets, type(self).__name__)
        return class_counts(outputs.argmax(-1), targets, self.num_classes).flatten()

    def _ratios(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tp, fp, fn = self.state.view(3, self.num_classes)
        if self.average == "micro":
            tp, fp, fn = tp.sum(0, keepdim=True), fp.sum(0, keepdim=True), fn.sum(0, keepdim=True)
        present = (tp + fp + fn) > 0
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0.0)
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), 0.0)
        f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)
        return precision, recall, f1, present

    def _mean(self, values: Tensor, present: Tensor) -> float:
        return values[present].mean().item() if present.any() else float("nan")


class Precision(_ClassCounts):
    def compute(self) -> float:
        precision, _, _, present = self._ratios()
        return self._mean(precision, present)


class Recall(_ClassCounts):
    def compute(self) -> float:
        _, recall, _, present = self._ratios()
        return self._mean(recall, present)


class F1(_ClassCounts):
    """Harmonic mean of precision and recall, per class (macro) or of the pooled counts (micro)."""

    def compute(self) -> float:
        _, _, f1, present = self._ratios()
        return self._mean(f1, present)


class Perplexity(Metric):
    """exp(mean negative log-likelihood per target token). State: [sum of NLL, token count]."""

    higher_is_better = False

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def batch_state(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_classification(outputs, targets, "Perplexity")
        flat = targets.reshape(-1)
        nll = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).double(), flat, reduction="sum",
                              ignore_index=self.ignore_index)
        count = (flat != self.ignore_index).sum()
        return torch.stack([nll.cpu(), count.double().cpu()])

    def compute(self) -> float:
        nll, count = self.state.tolist()
        return math.exp(nll / count) if count else float("nan")


def class_counts(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """(3, C) float64: per class true positives, false positives, false negatives."""
    predictions, targets = predictions.reshape(-1).cpu(), targets.reshape(-1).cpu()
    tp = torch.bincount(targets[predictions == targets], minlength=num_classes)
    predicted = torch.bincount(predictions, minlength=num_classes)
    actual = torch.bincount(targets, minlength=num_classes)
    return torch.stack([tp, predicted - tp, actual - tp]).double()


def _once(metric: Metric, outputs: Tensor, targets: Tensor) -> float:
    metric.update(outputs, targets)
    return metric.compute()


def accuracy(logits: Tensor, targets: Tensor) -> float:
    return _once(Accuracy(), logits, targets)


def precision_recall_f1(logits: Tensor, targets: Tensor, num_classes: int, average: str = "macro"
                        ) -> tuple[float, float, float]:
    return (_once(Precision(num_classes, average), logits, targets),
            _once(Recall(num_classes, average), logits, targets),
            _once(F1(num_classes, average), logits, targets))


def perplexity(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> float:
    return _once(Perplexity(ignore_index), logits, targets)
