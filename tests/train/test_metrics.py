"""Metrics against values worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdl.train.metrics import F1, Accuracy, Perplexity, Precision, Recall, accuracy, perplexity, precision_recall_f1

#                  0  0  1  1  2  2
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDICTIONS = torch.tensor([0, 1, 1, 1, 0, 2])
# Per class (tp, fp, fn): 0 -> (1, 1, 1), 1 -> (2, 1, 0), 2 -> (1, 0, 1)
P = [1 / 2, 2 / 3, 1.0]
R = [1 / 2, 1.0, 1 / 2]
F1S = [1 / 2, 4 / 5, 2 / 3]


def one_hot_logits(predictions: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(predictions, classes).float() * 5.0 - 1.0


def test_accuracy():
    assert accuracy(one_hot_logits(PREDICTIONS, 3), TARGETS) == pytest.approx(4 / 6)


def test_macro_precision_recall_f1():
    p, r, f1 = precision_recall_f1(one_hot_logits(PREDICTIONS, 3), TARGETS, num_classes=3, average="macro")
    assert p == pytest.approx(sum(P) / 3)   # 0.7222
    assert r == pytest.approx(sum(R) / 3)   # 0.6667
    assert f1 == pytest.approx(sum(F1S) / 3)  # 0.6556


def test_micro_scores_equal_accuracy_for_single_label_data():
    p, r, f1 = precision_recall_f1(one_hot_logits(PREDICTIONS, 3), TARGETS, num_classes=3, average="micro")
    assert p == pytest.approx(4 / 6) and r == pytest.approx(4 / 6) and f1 == pytest.approx(4 / 6)


def test_macro_ignores_classes_absent_from_targets_and_predictions():
    # A fourth class that never occurs does not drag the macro mean down (scikit-learn's convention).
    p, r, f1 = precision_recall_f1(one_hot_logits(PREDICTIONS, 4), TARGETS, num_classes=4, average="macro")
    assert (p, r, f1) == pytest.approx((sum(P) / 3, sum(R) / 3, sum(F1S) / 3))


def test_a_class_only_predicted_counts_with_zero_recall_ratio_defined_as_zero():
    targets, predictions = torch.tensor([0, 0]), torch.tensor([0, 1])
    # class 0: tp 1, fp 0, fn 1 -> P 1, R 1/2; class 1: tp 0, fp 1, fn 0 -> P 0, R 0/0 := 0
    p, r, _ = precision_recall_f1(one_hot_logits(predictions, 2), targets, num_classes=2, average="macro")
    assert p == pytest.approx(0.5) and r == pytest.approx(0.25)


def test_perplexity_of_uniform_and_of_known_probabilities():
    assert perplexity(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(4.0)
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    targets = torch.tensor([0, 1])
    expected = math.exp(-(math.log(0.5) + math.log(0.8)) / 2)
    assert perplexity(probs.log(), targets) == pytest.approx(expected)


def test_perplexity_skips_ignored_targets():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = targets.clone()
    masked[:, 3:] = -100
    expected = math.exp(F.cross_entropy(logits[:, :3].reshape(-1, 7), targets[:, :3].reshape(-1)).item())
    assert perplexity(logits, masked) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("make", [Accuracy, lambda: Precision(5, "macro"), lambda: Recall(5, "micro"),
                                  lambda: F1(5, "macro"), Perplexity])
def test_accumulating_batches_equals_one_big_batch(make):
    logits, targets = torch.randn(30, 5), torch.randint(0, 5, (30,))
    whole, parts = make(), make()
    whole.update(logits, targets)
    for chunk in range(3):
        parts.update(logits[chunk * 10:(chunk + 1) * 10], targets[chunk * 10:(chunk + 1) * 10])
    assert parts.compute() == pytest.approx(whole.compute(), rel=1e-12)
    # States add up: what the trainer all-reduces across ranks.
    torch.testing.assert_close(parts.state, whole.state, rtol=1e-12, atol=0)


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="need targets of shape"):
        accuracy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
