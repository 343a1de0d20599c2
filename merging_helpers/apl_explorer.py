"""Introduced in chapter 4: explore APL's calibrated drop rates and what they do to one expert.

``rate_map`` draws the drop rates Eq. 11 (or the linear rank mapping) gives one expert's
partitions — a bar per block at the layer level, a 12 × 32 picture of the 384 hidden
states — on a colour scale that spans the band λ ± ε. ``prune_and_score`` prunes that
expert with those rates and with plain DARE (same seed: the same random numbers) and
scores both on its task. ``explore`` wraps the two in an ipywidgets explorer (expert,
level, λ, ε, τ₁, normalise); like chapter 1's explorer it needs a live kernel, and the
book's page shows the static figures drawn with ``rate_map`` beside it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import apl
from .optional import require
from .recipes import merge_state_dicts

LAMBDAS = (0.5, 0.9, 0.95, 0.99, 0.995)
EPSILONS = (0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1)
TAUS = (5.0, 1.0, 0.2, 0.05, 0.01)


def rate_map(importance: apl.Importance, lam: float, eps: float, tau: float = 5.0, normalise: bool = False,
             mapping: str = "tanh", ax=None):
    """Draw one expert's per-partition drop rates (chapter 4) and return the axes. Colours run
    from λ − ε (dark: the most important partitions keep the most) to λ + ε."""
    import matplotlib
    import matplotlib.pyplot as plt

    rates = apl.drop_rates(importance, lam, eps, mapping, tau, normalise).numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    low, high = lam - eps, lam + eps
    if importance.level == "hidden" and len(rates) % 32 == 0:
        picture = ax.imshow(rates.reshape(-1, 32), cmap="viridis", vmin=low, vmax=high, aspect="auto",
                            interpolation="nearest")
        ax.figure.colorbar(picture, ax=ax, label="drop rate")
        ax.set(xlabel="h mod 32", ylabel="h // 32")
    else:
        colours = matplotlib.colormaps["viridis"]((rates - low) / max(high - low, 1e-12))
        ax.bar(range(len(rates)), rates, color=colours)
        ax.axhspan(low, high, color="grey", alpha=0.1)
        ax.axhline(lam, color="grey", ls="--", lw=0.8)
        ax.set_ylim(max(0.0, low - 0.5 * eps - 1e-4), min(1.0, high + 0.5 * eps + 1e-4))
        ax.set_xticks(range(len(rates)), importance.keys, fontsize=7)
        ax.set(ylabel="drop rate")
    moved = float(np.abs(rates - lam).max())
    ax.set_title(f"{importance.task}, {importance.level} level: rates in [{rates.min():.4f}, {rates.max():.4f}] "
                 f"(band λ ± ε = {lam} ± {eps}; largest move {moved:.2g})", fontsize=9)
    return ax


def prune_and_score(evaluator, zoo, importance: apl.Importance, lam: float, eps: float, tau: float = 5.0,
                    normalise: bool = False, mapping: str = "tanh", seed: int = 0, split: str = "test") -> dict:
    """Prune expert ``importance.task`` alone with APL's rates and with DARE at λ (same seed),
    and score both on its own task (chapter 4). Returns accuracies in %."""
    task = importance.task
    one = {task: zoo.experts[task]}
    merged = apl.merge(zoo.base, one, {task: importance}, lam, eps, mapping=mapping, tau=tau, normalise=normalise,
                       seed=seed)
    dare = merge_state_dicts(zoo.base, one, "dare_linear", drop_rate=lam, seed=seed, progress=False)
    score = evaluator.accuracy
    return {"APL": 100 * score(merged, split=split, tasks=[task])[task],
            "DARE": 100 * score(dare, split=split, tasks=[task])[task]}


def explore(evaluator, zoo, importances: Mapping[str, Mapping[str, apl.Importance]], split: str = "test"):
    """An ipywidgets explorer of Eq. 11 (chapter 4): ``importances[level][expert]`` as
    ``apl.trace`` returns them. The rate map follows every control; the accuracies of the
    pruned expert (APL vs DARE) are recomputed with the button (a merge and an evaluation)."""
    widgets = require("ipywidgets", "the APL explorer")
    import matplotlib.pyplot as plt
    from IPython.display import display

    levels = [lv for lv in apl.LEVELS if lv in importances and lv != "model"]
    if not levels:
        raise ValueError(f"explore: give importances of the layer or hidden level, got {list(importances)}")
    expert = widgets.Dropdown(options=list(importances[levels[0]]), description="expert")
    level = widgets.Dropdown(options=levels, description="level")
    lam = widgets.SelectionSlider(options=LAMBDAS, value=0.99, description="λ")
    eps = widgets.SelectionSlider(options=EPSILONS, value=0.005, description="ε")
    tau = widgets.SelectionSlider(options=TAUS, value=5.0, description="τ₁")
    normalise = widgets.Checkbox(value=False, description="normalise I")
    button = widgets.Button(description="prune & score")
    picture, scores = widgets.Output(), widgets.Output()

    def current():
        return importances[level.value][expert.value]

    def draw(_change=None):
        with picture:
            picture.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(7, 3))
            try:
                rate_map(current(), lam.value, eps.value, tau.value, normalise.value, ax=ax)
            except ValueError as err:  # e.g. λ + ε >= 1
                ax.set_axis_off()
                ax.text(0.5, 0.5, str(err), ha="center", va="center", wrap=True, fontsize=9)
            display(fig)
            plt.close(fig)

    def score(_click=None):
        with scores:
            scores.clear_output(wait=True)
            try:
                result = prune_and_score(evaluator, zoo, current(), lam.value, eps.value, tau.value, normalise.value,
                                         split=split)
                print(f"{expert.value} pruned at λ = {lam.value} ({split} accuracy): APL {result['APL']:.1f} %, "
                      f"DARE {result['DARE']:.1f} % (same seed)")
            except ValueError as err:
                print(err)

    for box in (expert, level, lam, eps, tau, normalise):
        box.observe(draw, names="value")
    button.on_click(score)
    draw()
    score()
    return widgets.VBox([widgets.HBox([expert, level, normalise]), widgets.HBox([lam, eps, tau]), picture,
                         widgets.HBox([button, scores])])
