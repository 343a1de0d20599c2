"""metrics: accuracy, P_t, the finite-gradient check and mean pooling, each against the sum written out."""
import math

import pytest
import torch

from merging_helpers import metrics


def test_accuracy_and_the_true_labels_probability_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([0, 0, 0])
    assert metrics.accuracy(logits, labels) == pytest.approx(2 / 3)
    by_hand = sum(math.exp(r[0]) / (math.exp(r[0]) + math.exp(r[1])) for r in logits.tolist()) / 3
    assert metrics.mean_true_label_probability(logits, labels) == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="3 rows of logits but 2 labels"):
        metrics.accuracy(logits, labels[:2])
    with pytest.raises(ValueError, match="empty set"):
        metrics.accuracy(logits[:0], labels[:0])


def test_mean_pool_ignores_the_padding():
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(metrics.mean_pool(hidden, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


def test_a_non_finite_gradient_is_named():
    metrics.check_finite_gradient({"a": torch.ones(2)})
    with pytest.raises(FloatingPointError, match=r"the gradient has NaN or inf entries in 'b'"):
        metrics.check_finite_gradient({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
