"""Evaluation metrics against hand-worked cases (chapter 0)."""
import math

import pytest
import torch

from merging_helpers import evaluation as ev


def test_accuracy_hand_worked():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.1]])
    labels = torch.tensor([0, 1, 1, 1])
    assert ev.accuracy(logits, labels) == pytest.approx(0.5)


def test_mean_true_label_probability_hand_worked():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = torch.tensor([1, 0])
    assert ev.mean_true_label_probability(logits, labels) == pytest.approx((0.75 + 0.5) / 2)


def test_majority_accuracy():
    assert ev.majority_accuracy([0, 1, 1, 2], [1, 1, 0, 2]) == pytest.approx(0.5)


def test_normalized_accuracy_and_missing_task():
    assert ev.normalized_accuracy({"a": 0.45}, {"a": 0.9, "b": 0.8}) == {"a": pytest.approx(0.5)}
    with pytest.raises(KeyError, match="b"):
        ev.normalized_accuracy({"b": 0.1}, {"a": 0.9})


def test_task_and_domain_ratio():
    assert ev.task_ratio(0.6, 0.8) == pytest.approx(0.75)
    # geometric mean of 0.5 and 2 is 1; of 0.25, 1, 4 is 1; of 0.9 and 0.4 is 0.6
    assert ev.domain_ratio([0.5, 2.0]) == pytest.approx(1.0)
    assert ev.domain_ratio({"x": 0.25, "y": 1.0, "z": 4.0}) == pytest.approx(1.0)
    assert ev.domain_ratio([0.9, 0.4]) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [[], [0.5, 0.0], [-1.0]])
def test_domain_ratio_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        ev.domain_ratio(bad)


def test_task_ratio_rejects_zero_dense():
    with pytest.raises(ValueError, match="positive dense score"):
        ev.task_ratio(0.5, 0.0)


def test_accuracy_shape_mismatch():
    with pytest.raises(ValueError, match="3 rows of logits but 2 labels"):
        ev.accuracy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
