"""Introduced in chapter 7: explore the RMS-adaptive drop rates and what they do to a merge.

``rate_map`` draws the rates p_k^t that :func:`merging_helpers.rms_adaptive.adaptive_rates`
gives every expert's block matrices (one panel per expert: layers × matrices) for a
p_default, a λ and a CV threshold; ``merge_and_score`` merges the experts with those rates
and scores the merge on the experts' tasks. ``explore`` wraps the two in an ipywidgets
explorer; it needs a live kernel, and the book's page shows static figures drawn with
``rate_map`` beside it.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import rms_adaptive as ra
from .optional import require
from .options import options_from
from .partitions import describe

P_DEFAULTS = (0.5, 0.7, 0.8, 0.9, 0.95)
LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)  # in units of 1/σ of each role's RMS values (scale="std")
CV_THRESHOLDS = (10.0, 25.0, 50.0, 100.0, 200.0)


def rates_quietly(table, p_default, lam, cv_threshold=ra.CV_THRESHOLD, aware=True, scale="std"):
    """:func:`~merging_helpers.rms_adaptive.adaptive_rates` with the clipping warning kept in
    ``info["clipped"]`` instead of printed (the chapter reports the count) (chapter 7)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ra.adaptive_rates(table, p_default, lam, cv_threshold, aware, scale)


def rate_grid(rates: Mapping[str, float]):
    """One expert's rates as a layers × matrices array, and the matrix labels (chapter 7)."""
    cells = {(describe(n).layer, describe(n).linear or n.rsplit(".", 2)[-2]): p for n, p in rates.items()}
    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(k[1] for k in cells))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), p in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = p
    return grid, layers, kinds


def rate_map(table, p_default: float, lam: float, cv_threshold: float = ra.CV_THRESHOLD, aware: bool = True,
             axes=None):
    """Draw p_k^t for every expert of ``table`` (:func:`~merging_helpers.rms_adaptive.rms_table`),
    one panel per expert, colours spanning the rates of all experts; returns (axes, info) (chapter 7)."""
    import matplotlib.pyplot as plt

    rates, info = rates_quietly(table, p_default, lam, cv_threshold, aware)
    experts = list(rates)
    if axes is None:
        _, axes = plt.subplots(1, len(experts), figsize=(2.2 * len(experts) + 1, 2.8), squeeze=False)
        axes = axes[0]
    values = [p for r in rates.values() for p in r.values()]
    low, high = min(values + [p_default]), max(values + [p_default])
    for ax, t in zip(axes, experts):
        grid, layers, kinds = rate_grid(rates[t])
        picture = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high + 1e-9, aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_title(t, fontsize=9)
    axes[0].set_ylabel("layer")
    axes[-1].figure.colorbar(picture, ax=list(axes), label="drop rate p")
    mean = "its own mean" if info["own_mean"] else "the global mean"
    axes[0].figure.suptitle(f"p_default {p_default}, λ {lam}/σ: CV {info['cv']:.0f} % → each matrix against {mean}; "
                            f"{info['clipped']} rates clipped", fontsize=9, y=1.02)
    return axes, info


@dataclass(frozen=True)
class ScoreOptions:
    """How :func:`merge_and_score` merges and scores (chapter 7): the distribution-``aware`` switch,
    the masks' ``seed``, the ``split`` scored, the scoring ``heads``."""

    aware: bool = True
    seed: int = 0
    split: str = "validation"
    heads: Mapping | None = None


def merge_and_score(evaluator, base, experts, table, p_default: float, lam: float, cv_threshold=ra.CV_THRESHOLD,
                    options: ScoreOptions | None = None, **given) -> dict:
    """Merge ``experts`` with the adaptive rates and score the merge on their tasks (%) (chapter 7);
    the knobs of :class:`ScoreOptions` as an object or by name (``split="test"``)."""
    o = options_from(ScoreOptions, options, given, "merge_and_score")
    rates, _ = rates_quietly(table, p_default, lam, cv_threshold, o.aware)
    merged = ra.merge(base, experts, rates, p_default, seed=o.seed)
    scores = evaluator.accuracy(merged, split=o.split, tasks=list(experts), heads=o.heads)
    return {t: 100 * v for t, v in scores.items()}


def explore(evaluator, base, experts, table, split: str = "validation"):
    """An ipywidgets explorer of the rule (chapter 7): p_default, λ and the CV threshold move
    the rate map at once; the button merges and scores (a merge and an evaluation)."""
    widgets = require("ipywidgets", "the RMS explorer")
    import matplotlib.pyplot as plt
    from IPython.display import display

    p = widgets.SelectionSlider(options=P_DEFAULTS, value=0.9, description="p_default")
    lam = widgets.SelectionSlider(options=LAMBDAS, value=0.1, description="λ (1/σ)")
    cv = widgets.SelectionSlider(options=CV_THRESHOLDS, value=ra.CV_THRESHOLD, description="CV threshold")
    button = widgets.Button(description="merge & score")
    picture, scores = widgets.Output(), widgets.Output()

    def draw(_change=None):
        with picture:
            picture.clear_output(wait=True)
            axes, _ = rate_map(table, p.value, lam.value, cv.value)
            display(axes[0].figure)
            plt.close(axes[0].figure)

    def score(_click=None):
        with scores:
            scores.clear_output(wait=True)
            result = merge_and_score(evaluator, base, experts, table, p.value, lam.value, cv.value, split=split)
            print(f"{split} accuracy (%): " + ", ".join(f"{t} {v:.1f}" for t, v in result.items())
                  + f"; mean {np.mean(list(result.values())):.1f}")

    for box in (p, lam, cv):
        box.observe(draw, names="value")
    button.on_click(score)
    draw()
    return widgets.VBox([widgets.HBox([p, lam, cv]), picture, widgets.HBox([button, scores])])
