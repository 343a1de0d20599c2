"""Introduced in chapter 3: is merge B really better than merge A?

Two merges scored on the *same* test examples are paired: most examples are right (or
wrong) under both, and only the examples where they disagree carry information. So we
compare them example by example instead of comparing two accuracies:

* :func:`paired_bootstrap` — the difference in mean accuracy over tasks (B − A, in
  points) with a percentile bootstrap interval: each round resamples every task's test
  examples with replacement, the *same* resample for A and B;
* :func:`mcnemar` — McNemar's exact test per task: of the n_AB examples where exactly
  one merge is right, is "B right, A wrong" more frequent than chance (binomial, ½)?

Both see only this zoo's test examples: they say nothing about another training seed of
the experts (the book has one zoo), which is often the larger source of variation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .optional import require


def _as_scores(x, what: str) -> np.ndarray:
    """Right/wrong per example as booleans, or (a random merge scored with several seeds) the
    share of seeds that got each example right, as floats in [0, 1]."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D vector of right/wrong per example, got shape {arr.shape}")
    if arr.dtype == bool or np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    if not (np.issubdtype(arr.dtype, np.floating) and ((arr >= 0) & (arr <= 1)).all()):
        raise ValueError(f"{what}: entries must be booleans (or 0/1), or shares of seeds in [0, 1]")
    return arr.astype(float)


def _paired(correct_a: Mapping, correct_b: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if set(correct_a) != set(correct_b):
        raise ValueError(f"the two merges were scored on different tasks: {sorted(correct_a)} vs {sorted(correct_b)}")
    out = {}
    for task in correct_a:
        a, b = _as_scores(correct_a[task], f"A[{task!r}]"), _as_scores(correct_b[task], f"B[{task!r}]")
        if a.shape != b.shape:
            raise ValueError(f"task {task!r}: A has {a.size} examples, B has {b.size}; a paired comparison "
                             "needs the same examples")
        out[task] = (a, b)
    return out


def mcnemar(correct_a, correct_b) -> tuple[int, int, float]:
    """McNemar's exact two-sided test on one task (chapter 3): returns
    (b_only, a_only, p): the examples only B gets right, only A gets right, and the
    probability of a split at least this uneven if neither merge were better."""
    a, b = _paired({"task": correct_a}, {"task": correct_b})["task"]
    if a.dtype != bool or b.dtype != bool:
        raise ValueError("mcnemar: needs right/wrong booleans for both merges, not shares of seeds")
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    n, k = b_only + a_only, min(b_only, a_only)
    if n == 0:
        return b_only, a_only, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return b_only, a_only, min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedResult:
    """B − A in points of mean accuracy over tasks, with its bootstrap interval (chapter 3)."""
    difference: float
    low: float
    high: float
    level: float
    per_task: dict  # task -> (difference in points, b_only, a_only, McNemar p)

    def __str__(self) -> str:
        return (f"{self.difference:+.2f} points ({100 * self.level:.0f}% paired bootstrap interval "
                f"[{self.low:+.2f}, {self.high:+.2f}])")


def paired_bootstrap(correct_a: Mapping, correct_b: Mapping, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> PairedResult:
    """Mean-over-tasks accuracy of B minus A (points) and a percentile bootstrap interval
    (chapter 3). ``correct_a[task]`` is a bool vector: example i of ``task``'s split right
    or wrong under merge A (:meth:`Evaluator.correct`); B must cover the same examples.
    A merge scored with several seeds may give the share of its seeds that got each example
    right instead (chapter 8); its per-task McNemar entries are then NaN."""
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"paired_bootstrap: n_boot must be >= 100, got {n_boot}")
    pairs = _paired(correct_a, correct_b)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    per_task = {}
    for task, (a, b) in pairs.items():
        diff = b.astype(float) - a.astype(float)          # +1, 0 or -1 per example
        idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
        boot += diff[idx].mean(axis=1)
        exact = a.dtype == bool and b.dtype == bool
        per_task[task] = (100 * diff.mean(), *(mcnemar(a, b) if exact else (math.nan,) * 3))
    boot *= 100 / len(pairs)
    point = float(np.mean([d for d, *_ in per_task.values()]))
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return PairedResult(point, float(low), float(high), level, per_task)


def per_task_frame(result: PairedResult, names=("B", "A")):
    """The per-task rows of a :class:`PairedResult` as a table (chapter 3)."""
    import pandas as pd
    b, a = names
    rows = [{"task": t, f"{b} − {a} (points)": d, f"only {b} right": bo, f"only {a} right": ao, "McNemar p": p}
            for t, (d, bo, ao, p) in result.per_task.items()]
    return pd.DataFrame(rows).set_index("task").round(3)


__all__ = ["mcnemar", "PairedResult", "paired_bootstrap", "per_task_frame"]


def seed_interval(differences, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired per-seed differences (B − A with the same mask seed) and its Student-t
    interval (chapter 4): the spread that another draw of the random masks would give.
    Needs at least two seeds."""
    stats = require("scipy.stats", "seed_interval")
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"seed_interval: need a 1-D vector of at least two per-seed differences, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"seed_interval: level must be in (0, 1), got {level}")
    mean, sem = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * sem
    return mean, mean - half, mean + half
