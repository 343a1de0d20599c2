import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from merging_helpers import paired
from merging_helpers.paired import mcnemar, paired_bootstrap, per_task_frame


def test_mcnemar_hand_worked():
    # 9 examples only B gets right, 1 only A: two-sided exact p = 2 · P(X <= 1), X ~ Bin(10, ½) = 22 / 1024
    a = [True] * 5 + [False] * 9 + [True] + [False] * 3
    b = [True] * 5 + [True] * 9 + [False] + [False] * 3
    assert mcnemar(a, b) == (9, 1, pytest.approx(22 / 1024))


@pytest.mark.parametrize("b_only,a_only", [(0, 0), (3, 3), (12, 4), (0, 7), (40, 25)])
def test_mcnemar_matches_scipy_binomial_test(b_only, a_only):
    a = np.array([False] * b_only + [True] * a_only + [True] * 10)
    b = np.array([True] * b_only + [False] * a_only + [True] * 10)
    _, _, p = mcnemar(a, b)
    expected = 1.0 if b_only + a_only == 0 else binomtest(b_only, b_only + a_only, 0.5).pvalue
    assert p == pytest.approx(expected)


def test_identical_merges_differ_by_exactly_zero():
    x = {"t": torch.tensor([True, False, True, True])}
    r = paired_bootstrap(x, x)
    assert (r.difference, r.low, r.high) == (0.0, 0.0, 0.0)
    assert r.per_task["t"][3] == 1.0


def test_bootstrap_interval_matches_the_normal_approximation():
    # one task, n examples, b_only / a_only discordant pairs: the paired difference has
    # standard error sqrt((b + c)/n² − (b − c)²/n³) (closed form for paired proportions)
    rng = np.random.default_rng(1)
    n, b_only, a_only = 4000, 300, 200
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    b[:b_only] = True
    a[b_only:b_only + a_only] = True
    both = rng.choice(np.arange(b_only + a_only, n), 2000, replace=False)
    a[both] = b[both] = True
    r = paired_bootstrap({"t": a}, {"t": b}, n_boot=4000)
    se = 100 * math.sqrt((b_only + a_only) / n**2 - (b_only - a_only) ** 2 / n**3)
    assert r.difference == pytest.approx(100 * (b_only - a_only) / n)
    assert (r.high - r.low) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_mean_over_tasks_and_swapping_negates():
    a = {"x": [True, True, False, False], "y": [True] * 10}
    b = {"x": [True, True, True, True], "y": [True] * 9 + [False]}
    r = paired_bootstrap(a, b, n_boot=500)
    assert r.difference == pytest.approx((50.0 - 10.0) / 2)
    swapped = paired_bootstrap(b, a, n_boot=500)
    assert swapped.difference == pytest.approx(-r.difference)
    assert swapped.low == pytest.approx(-r.high) and swapped.high == pytest.approx(-r.low)
    frame = per_task_frame(r)
    assert list(frame.index) == ["x", "y"] and frame.loc["x", "only B right"] == 2


@pytest.mark.parametrize("a,b,match", [
    ({"t": [True]}, {"u": [True]}, "different tasks"),
    ({"t": [True, False]}, {"t": [True]}, "same examples"),
    ({"t": []}, {"t": []}, "non-empty"),
    ({"t": [1.5, 1.0]}, {"t": [1, 0]}, "booleans"),
    ({"t": ["x", "y"]}, {"t": [1, 0]}, "booleans"),
])
def test_bad_input_is_named(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b)


def test_seed_interval_hand_worked_and_bad_input():
    mean, low, high = paired.seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) × sd / √n, sd = 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    with pytest.raises(ValueError, match="at least two"):
        paired.seed_interval([1.0])
    with pytest.raises(ValueError, match="level"):
        paired.seed_interval([1.0, 2.0], level=1.5)


def test_shares_of_seeds_give_the_mean_of_the_per_seed_differences():
    rng = np.random.default_rng(3)
    a = {t: rng.random(50) < 0.7 for t in ("x", "y")}
    seeds = [{t: rng.random(50) < 0.6 for t in ("x", "y")} for _ in range(5)]
    shares = {t: np.mean([s[t] for s in seeds], axis=0) for t in ("x", "y")}
    pooled = paired_bootstrap(a, shares)
    per_seed = np.mean([paired_bootstrap(a, s).difference for s in seeds])
    assert pooled.difference == pytest.approx(per_seed)
    assert pooled.low < pooled.difference < pooled.high
    assert all(np.isnan(p) for *_, p in pooled.per_task.values())  # no McNemar on shares
    hand = paired_bootstrap({"t": np.array([True, False, True, False])}, {"t": np.array([1, 1, 0.5, 0.25])})
    assert hand.difference == pytest.approx(100 * (0 + 1 - 0.5 + 0.25) / 4)
    with pytest.raises(ValueError, match="shares of seeds in"):
        paired_bootstrap({"t": np.array([True, False])}, {"t": np.array([1.5, 0.2])})
