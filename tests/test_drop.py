"""Drop rules: bad rates refused, DARE and DELLA unbiased (merging_helpers.drop, chapter 2)."""
import math

import pytest
import torch

from merging_helpers import recipes
from merging_helpers.drop import (
    magnitude_keep_mask,
    magprune_keep,
    magprune_keep_prob,
    random_keep_mask,
    threshold_keep_mask,
)
from merging_helpers.rng import EntryRandoms
from merging_helpers.selection import kth_largest_abs


def test_drop_rules_reject_bad_rates():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"drop_rate = 1.0 .*\[0, 1\)"):
        random_keep_mask(x, 1.0, EntryRandoms(0, "x", 0))
    with pytest.raises(ValueError, match=r"density = 0 .*\(0, 1\]"):
        magnitude_keep_mask(x, 0)
    with pytest.raises(ValueError, match="epsilon = 0.3"):
        magprune_keep_prob(x, 0.8, 0.3)
    with pytest.raises(ValueError, match="threshold"):
        threshold_keep_mask(x, -1.0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        kth_largest_abs(x, 11)
    with pytest.raises(TypeError, match="torch.Tensor"):
        magnitude_keep_mask([1.0, 2.0], 0.5)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_preserves_expected_delta_per_entry(p):
    delta = torch.linspace(-1, 1, 64)
    runs = 3000
    total = sum(recipes.drop_and_rescale([delta], "random", [1 - p], name="t", seed=s)[0] for s in range(runs))
    # Δ̂_i = Δ_i · Bernoulli(1−p)/(1−p): variance Δ_i² p/(1−p); 5 standard errors
    tolerance = 5 * delta.abs() * math.sqrt(p / (1 - p) / runs) + 1e-6
    assert ((total / runs - delta).abs() <= tolerance).all()


def test_della_keep_prob_and_unbiased_rescale():
    delta = torch.randn(4, 101, generator=torch.Generator().manual_seed(0))
    prob = magprune_keep_prob(delta, 0.5, 0.2)
    assert torch.allclose(prob.min(1).values, torch.full((4,), 0.3)) and torch.allclose(prob.max(1).values, torch.full((4,), 0.7))
    assert torch.allclose(prob.mean(1), torch.full((4,), 0.5))
    assert torch.equal(prob.argmax(1), delta.abs().argmax(1))  # largest |Δ| is the most likely kept
    runs = 2000
    mean = sum(recipes.drop_and_rescale([delta], "magprune", [0.5], name="d", seed=s, epsilon=0.2)[0] for s in range(runs)) / runs
    tolerance = 5 * delta.abs() * torch.sqrt((1 - prob) / prob / runs) + 1e-6
    assert ((mean - delta).abs() <= tolerance).all()
    mask, _ = magprune_keep(delta, 0.5, 0.2, EntryRandoms(0, "d", 0))
    assert abs(mask.float().mean() - 0.5) < 5 * math.sqrt(0.25 / mask.numel())


def test_a_floored_density_keeps_int_d_n_like_mergekit_and_a_float_round_d_n():
    from merging_helpers.config import MergeConfig
    from merging_helpers.drop import keep_count, magnitude_keep_mask
    from merging_helpers.partitions import Floored
    delta = torch.tensor([0.9, -0.8, 0.7, -0.6, 0.5, 0.4, -0.3, 0.2, 0.1, 0.05])
    assert (keep_count(0.36, 10), keep_count(Floored(0.36), 10)) == (4, 3)  # 3.6: rounded, and cut as int() does
    assert int(magnitude_keep_mask(delta, 0.36).sum()) == 4
    assert magnitude_keep_mask(delta, Floored(0.36)).tolist() == [True] * 3 + [False] * 7
    config = MergeConfig.build("ties", 2, density=[0.36, 0.5], count_rounding="floor")
    assert [type(d) for d in config.densities("w")] == [Floored, Floored] and config.densities("w") == [0.36, 0.5]
    with pytest.raises(ValueError, match="count_rounding='floor' rounds the kept count of a per-tensor magnitude"):
        MergeConfig.build("dare_ties", 2, density=0.5, count_rounding="floor")
    with pytest.raises(ValueError, match=r"count_rounding must be one of \('round', 'floor'\), got 'down'"):
        MergeConfig.build("ties", 2, density=0.5, count_rounding="down")


def _breadcrumbs_by_sorting(delta, density, gamma):
    """Model Breadcrumbs written out as mergekit 0.1.5 writes it (sparsify.magnitude_outliers): sort |Δ|
    ascending, keep the int(d·n) entries after the int(n − d·n − γ·n) smallest."""
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.sort(delta.abs().reshape(-1)).indices[n_bot:n_bot + target]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("shape, density, gamma", [((40, 25), 0.3, 0.05), ((1000,), 0.9, 0.2), ((7, 9), 0.5, 0.0),
                                                   ((50, 4), 0.1, 0.0101), ((10, 10), 1.0, 0.3)])
def test_breadcrumbs_keeps_what_mergekits_sort_keeps(shape, density, gamma):
    from merging_helpers.drop import breadcrumbs_keep_mask
    from merging_helpers.partitions import Floored
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    got = breadcrumbs_keep_mask(delta, Floored(density), gamma)
    assert torch.equal(got, _breadcrumbs_by_sorting(delta, density, gamma))
    top = int(gamma * delta.numel())
    if top and density < 1:  # the outliers are gone: the largest |Δ| is not kept
        assert not bool(got.reshape(-1)[delta.abs().reshape(-1).argmax()])


def test_breadcrumbs_is_one_registry_entry_through_both_front_doors(tmp_path):
    """The new method by name, in memory: each expert's breadcrumbs mask, then Task Arithmetic's sum."""
    from merging_helpers.recipes import merge_state_dicts
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(30, 20, generator=g)}
    experts = [{"w": base["w"] + torch.randn(30, 20, generator=g)} for _ in range(2)]
    got = merge_state_dicts(base, experts, "breadcrumbs", density=0.4, gamma=0.1, weights=[1.0, 0.5],
                            count_rounding="floor", progress=False)["w"]
    deltas = [e["w"] - base["w"] for e in experts]
    want = base["w"] + sum(w * d * _breadcrumbs_by_sorting(d, 0.4, 0.1) for w, d in zip((1.0, 0.5), deltas))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="gamma is breadcrumbs' outlier fraction"):
        merge_state_dicts(base, experts, "ties", density=0.4, gamma=0.1, progress=False)
    with pytest.raises(ValueError, match=r"a number in \[0, 1\)"):
        merge_state_dicts(base, experts, "breadcrumbs", density=0.4, gamma=1.0, progress=False)


def test_magprune_without_a_band_keeps_every_entry_at_its_density_bit_for_bit():
    from merging_helpers.partitions import PerRow
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(6, 50, generator=g)
    prob = magprune_keep_prob(delta, 0.3, 0.0)
    assert prob.dtype == torch.float32 and torch.equal(prob, torch.full((6, 50), 0.3))
    rows = PerRow(torch.linspace(0.2, 0.7, 6))
    want = (torch.linspace(0.2, 0.7, 6).double() - 0.0).float()[:, None].expand(6, 50)
    assert torch.equal(magprune_keep_prob(delta, rows, 0.0), want)
    # the band's general formula at ε = 0 (ranks multiplied by 0) gives the same bits
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1, stable=True), dim=1).float()
    assert torch.equal(prob, (0.3 - 0.0) + (0.0 * 2 * ranks / 49))
