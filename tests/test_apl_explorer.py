"""Chapter 4's APL explorer: the map draws exactly the calibrated rates, DARE and APL are
paired by seed, and bad settings are shown instead of raised inside the widget."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import bert_like, expert_of  # noqa: E402

from merging_helpers import apl  # noqa: E402
from merging_helpers.apl_explorer import explore, prune_and_score, rate_map  # noqa: E402


def _importance(level, n, task="news"):
    keys = [f"{level}.{i}" for i in range(n)]
    values = -torch.linspace(0.001, 0.3, n, dtype=torch.float64).flip(0)  # partition 0 least important
    return apl.Importance(task, level, keys, values, clean=0.9, few_shot_accuracy=1.0)


def test_layer_map_draws_the_calibrated_rates():
    imp = _importance("layer", 6)
    ax = rate_map(imp, 0.9, 0.05, tau=0.05)
    heights = [bar.get_height() for bar in ax.containers[0]]
    np.testing.assert_allclose(heights, apl.drop_rates(imp, 0.9, 0.05, tau=0.05).numpy())
    assert "layer level" in ax.get_title()
    plt.close("all")


def test_hidden_map_is_a_picture_of_every_hidden_state():
    imp = _importance("hidden", 384)
    ax = rate_map(imp, 0.99, 0.005, mapping="linear")
    picture = ax.images[0].get_array()
    assert picture.shape == (12, 32)
    np.testing.assert_allclose(np.asarray(picture).ravel(), apl.linear_drop_rates(imp.values, 0.99, 0.005).numpy())
    plt.close("all")


class _Zoo:
    def __init__(self):
        self.base = bert_like(n_layers=2)
        self.experts = {"news": expert_of(self.base, seed=1)}


class _Evaluator:  # "accuracy" = a fixed function of the merged weights, so equal merges score equally
    def accuracy(self, state, split="test", tasks=None):
        return {t: float(state["encoder.layer.1.output.dense.weight"].sum()) for t in tasks}


def test_with_no_band_apl_is_dare_and_with_a_band_it_is_not():
    zoo, ev, imp = _Zoo(), _Evaluator(), _importance("layer", 2)
    same = prune_and_score(ev, zoo, imp, 0.9, 0.0, seed=3)
    assert same["APL"] == same["DARE"]  # ε = 0: the same random numbers drop the same entries
    moved = prune_and_score(ev, zoo, imp, 0.9, 0.05, tau=0.01, seed=3)
    assert moved["DARE"] == same["DARE"] and moved["APL"] != moved["DARE"]


def test_explore_shows_a_bad_band_instead_of_raising():
    pytest.importorskip("ipywidgets")
    zoo, ev = _Zoo(), _Evaluator()
    box = explore(ev, zoo, {"layer": {"news": _importance("layer", 2)}})
    (expert, level, normalise), (lam, eps, _tau) = box.children[0].children, box.children[1].children
    assert list(expert.options) == ["news"] and list(level.options) == ["layer"]
    lam.value, eps.value = 0.995, 0.1  # λ + ε > 1: shown as text, not raised
    normalise.value = True
    with pytest.raises(ValueError, match="layer or hidden"):
        explore(ev, zoo, {"model": {}})
    plt.close("all")
