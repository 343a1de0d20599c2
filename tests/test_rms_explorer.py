"""Chapter 7's RMS explorer: the map draws exactly the adaptive rates, merge_and_score merges
with them, and the widget reacts to its controls."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import bert_like, expert_of  # noqa: E402

from merging_helpers import rms_adaptive as ra  # noqa: E402
from merging_helpers.deltas import task_vector  # noqa: E402
from merging_helpers.rms_explorer import explore, merge_and_score, rate_grid, rate_map, rates_quietly  # noqa: E402


def _setting():
    base = bert_like(n_layers=2)
    experts = {"news": expert_of(base, seed=1), "sign": expert_of(base, seed=2)}
    table = ra.rms_table({t: task_vector(base, e) for t, e in experts.items()})
    return base, experts, table


def test_rate_map_draws_the_adaptive_rates():
    _, _, table = _setting()
    axes, info = rate_map(table, 0.9, 0.4)
    rates, expected = rates_quietly(table, 0.9, 0.4)
    assert info == expected
    for ax, t in zip(axes, table):
        grid, layers, kinds = rate_grid(rates[t])
        assert layers == [0, 1] and kinds == ["q", "o", "up", "down"]  # the matrices bert_like has
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), grid)
        assert sorted(grid.ravel()) == sorted(rates[t].values())
    plt.close("all")


def test_rates_quietly_counts_what_it_clips():
    _, _, table = _setting()
    with pytest.warns(UserWarning, match="clipped"):
        _, loud = ra.adaptive_rates(table, 0.9, 50.0, scale="std")
    _, quiet = rates_quietly(table, 0.9, 50.0)
    assert quiet["clipped"] == loud["clipped"] > 0


class _Evaluator:  # "accuracy" = a fixed function of the merged weights, so equal merges score equally
    def accuracy(self, state, split="test", tasks=None, heads=None):
        return {t: float(state["encoder.layer.1.output.dense.weight"].sum()) for t in tasks}


def test_merge_and_score_merges_with_the_rates():
    base, experts, table = _setting()
    ev = _Evaluator()
    score = merge_and_score(ev, base, experts, table, 0.9, 0.4, seed=2)
    rates, _ = rates_quietly(table, 0.9, 0.4)
    direct = 100 * ev.accuracy(ra.merge(base, experts, rates, 0.9, seed=2), tasks=["news"])["news"]
    assert score["news"] == pytest.approx(direct)
    assert merge_and_score(ev, base, experts, table, 0.9, 0.0, seed=2) != score  # λ moves the merge


def test_explore_reacts_to_its_controls():
    pytest.importorskip("ipywidgets")
    base, experts, table = _setting()
    box = explore(_Evaluator(), base, experts, table)
    p, lam, cv = box.children[0].children
    p.value, lam.value, cv.value = 0.7, 0.8, 10.0
    button = box.children[2].children[0]
    button.click()
    plt.close("all")
