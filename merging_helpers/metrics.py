"""Introduced in chapter 0: the few measurements that methods need as well as the book.

Accuracy of logits, the mean true-label probability (APL's P_t), a finite-gradient check and
the mean pooling of the encoder's hidden states. They import nothing of the package, so a
method module (``apl``, ``taylor``, ``fast.lean_importance``) can use them without reaching
into the book's scoring (``evaluation``) or its model zoo (``zoo``), which re-export them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label (chapter 0)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy: {logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


def check_finite_gradient(gradient: Mapping[str, torch.Tensor], what: str = "the gradient") -> None:
    """Raise FloatingPointError naming the first parameter whose gradient has NaN or inf (chapters 0, 5)."""
    for name, g in gradient.items():
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"{what} has NaN or inf entries in {name!r}")


def mean_true_label_probability(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of softmax(logits)[label]: APL's P_t (chapter 4)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    probs = logits.float().softmax(-1)
    return probs.gather(1, labels.to(probs.device).view(-1, 1)).mean().item()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real (unpadded) tokens: the sentence embedding (chapter 0)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
