"""Introduced in chapter 2: the loops behind the book's sweeps, as tidy pandas frames.

Every sweep merges with :func:`merging_helpers.recipes.merge_state_dicts` (through the compiled
kernel where it applies: :func:`merging_helpers.fast.in_memory.merge_state_dicts`, the same
tensors bit for bit, several times faster) and scores
with an :class:`~merging_helpers.evaluation.Evaluator` (anything with a method
``accuracy(state_dict, split=..., tasks=...) -> {task: accuracy}`` works, which is how
the tests use a tiny fake evaluator). Frames are *long*: one row per (setting, seed,
task), accuracy as a fraction in [0, 1], ready for ``seaborn`` (``hue="task"``) or a
``pivot_table``.

* :func:`merge_grid` — any recipe over a list of settings × seeds (the general loop);
* :func:`lambda_sweep` — Task Arithmetic (or any recipe) as λ varies: every recipe ends
  with θ_b + λ·τ, so :func:`merged_delta` merges τ once and :func:`scan_lambdas` only
  evaluates θ_b + λτ per λ;
* :func:`pick_lambda` — the λ with the best mean accuracy in a sweep (use validation!);
* :func:`pruned_expert` / :func:`pruning_curve` / :func:`pruning_curves` — one expert
  pruned at several drop rates, scored on its own task;
* :func:`dare_layer_outputs` — a linear layer's output under many random DARE masks;
* :func:`rescale_factors` — DARE's 1/(1 − p) vs mergekit's L1 rescale, per tensor;
* :func:`seed_summary` / :func:`mean_std_table` — mean ± std over seeds, per setting.

Seeds: random recipes (``RANDOM_METHODS``) are merged once per seed; deterministic ones
(magnitude, TIES, Task Arithmetic) are merged once per setting and get ``seed = <NA>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import pandas as pd
import torch
from tqdm.auto import tqdm

from .deltas import apply_delta, task_vectors
from .drop import random_keep_mask
from .evaluation import choose_lambda
from .methods import registry
from .options import options_from
from .fast.in_memory import merge_state_dicts
from .rng import EntryRandoms

RANDOM_METHODS = frozenset(m.name for m in registry().values() if m.random)  # read from the records


def _label(method, label, merge_kwargs):
    if label is not None:
        return label
    rescale = merge_kwargs.get("rescale", "auto")
    return method if rescale == "auto" else f"{method} (rescale={rescale})"


def _runs(method, grid, seeds):
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    seeds = seeds if method in RANDOM_METHODS else [None]
    return [(setting, seed) for setting in grid for seed in seeds]


@dataclass(frozen=True)
class GridRun:
    """How :func:`merge_grid` runs (chapter 2): the ``label`` of its rows, a progress bar, or an
    outer ``bar`` to advance instead of drawing one."""

    label: str | None = None
    progress: bool = True
    bar: object = None


def merge_grid(evaluator, base, experts, method, grid, seeds=(0,), split="test", tasks=None, *,
               run: GridRun | None = None, **merge_kwargs) -> pd.DataFrame:
    """Introduced in chapter 2: merge ``experts`` onto ``base`` with ``method`` for every
    setting in ``grid`` (a list of dicts of ``merge_state_dicts`` keyword arguments,
    e.g. ``[{"drop_rate": 0.9}, {"drop_rate": 0.99}]``) and every seed, and score each
    merge on ``tasks`` (default: all of the evaluator's) on ``split``.

    ``merge_kwargs`` are passed to every merge (e.g. ``lam=0.3``, ``rescale="l1"``);
    a key in a setting overrides them. Deterministic methods are merged once per setting
    (seed <NA>). Returns columns ``method, <one per grid key>, seed, split, task, accuracy``
    (``method`` is ``label`` if given, else the recipe name plus a non-default rescale).
    ``label``, ``progress`` and ``bar`` (an outer tqdm bar to advance instead of drawing one here):
    a :class:`GridRun`, or by name.
    """
    run = options_from(GridRun, run, {f.name: merge_kwargs.pop(f.name) for f in fields(GridRun)
                                      if f.name in merge_kwargs}, "merge_grid")
    label, progress, bar = run.label, run.progress, run.bar
    grid = [dict(setting) for setting in grid]
    if not grid:
        raise ValueError("grid: give at least one setting (a dict of merge keyword arguments)")
    keys = list(dict.fromkeys(k for setting in grid for k in setting))
    name = _label(method, label, merge_kwargs)
    runs = _runs(method, grid, seeds)
    own_bar = bar is None
    bar = bar if bar is not None else tqdm(total=len(runs), desc=f"{name} sweep", disable=not progress)
    rows = []
    try:
        for setting, seed in runs:
            kwargs = {**merge_kwargs, **setting}
            if seed is not None:
                kwargs["seed"] = seed
            merged = merge_state_dicts(base, experts, method, progress=False, **kwargs)
            scores = evaluator.accuracy(merged, split=split, tasks=tasks)
            for task, acc in scores.items():
                rows.append({"method": name, **{k: setting.get(k, merge_kwargs.get(k)) for k in keys},
                             "seed": seed, "split": split, "task": task, "accuracy": float(acc)})
            bar.update(1)
    finally:
        if own_bar:
            bar.close()
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def merged_delta(deltas, method: str, *, progress: bool = False, **merge_kwargs) -> dict:
    """Introduced in chapter 2: the merged task vector of ``method`` at λ = 1.

    ``deltas``: the experts' task vectors (a list, or a dict name → delta, as from
    :func:`~merging_helpers.deltas.task_vectors`). This is
    :func:`~merging_helpers.recipes.merge_state_dicts` run on a **zero base** with the
    deltas as experts: every recipe only sees Δ_t = expert − base, so the result is the
    merged delta, bit for bit, and ``apply_delta(base, merged, lam)`` equals
    ``merge_state_dicts(base, experts, method, lam=lam, ...)``. Merging once and
    scanning λ by evaluation alone is what makes λ grids affordable.
    """
    if "lam" in merge_kwargs:
        raise ValueError("merged_delta returns the λ = 1 delta; scale it with apply_delta(base, merged, lam)")
    if isinstance(deltas, Mapping):
        deltas = dict(deltas)
    first = next(iter(deltas.values())) if isinstance(deltas, dict) else list(deltas)[0]
    zero = {name: torch.zeros_like(t) for name, t in first.items()}
    return merge_state_dicts(zero, deltas, method, progress=progress, **merge_kwargs)


def scan_lambdas(evaluator, base: dict, merged: dict, lambdas, split: str = "validation", tasks=None, *,
                 label: str = "merge", seed=None, progress: bool = False, bar=None):
    """Introduced in chapter 2: score θ_b + λ · merged for every λ (merged once, by
    :func:`merged_delta`). Returns the long frame of :func:`lambda_sweep` (columns
    ``method, lam, seed, split, task, accuracy``, accuracy a fraction), so that
    :func:`pick_lambda` and :func:`seed_summary` apply; ``method`` is ``label``.
    ``bar``: an outer tqdm bar to advance instead of drawing one here.
    """
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("scan_lambdas: give at least one λ")
    rows = []
    for lam in tqdm(lambdas, desc=f"λ ({label})", disable=not progress or bar is not None, leave=False):
        scores = evaluator.accuracy(apply_delta(base, merged, lam), split=split, tasks=tasks)
        rows += [{"method": label, "lam": lam, "seed": seed, "split": split, "task": task, "accuracy": float(acc)}
                 for task, acc in scores.items()]
        if bar is not None:
            bar.update(1)
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def lambda_sweep(evaluator, base, experts, lambdas, split="test", tasks=None, *, method="task_arithmetic",
                 seeds=(0,), progress=True, **merge_kwargs) -> pd.DataFrame:
    """Introduced in chapter 2: θ_b + λ · recipe(Δ_1..Δ_T) for every λ in ``lambdas``,
    scored on ``split``. Returns columns ``method, lam, seed, split, task, accuracy``
    (one row per λ and task; per seed too for random recipes). Weight averaging is
    Task Arithmetic at λ = 1/T.

    Every recipe ends with θ_b + λ·τ, so τ is merged once per seed (:func:`merged_delta`)
    and only the evaluation is repeated per λ (:func:`scan_lambdas`); the scores equal
    :func:`merge_grid` over ``lam``, bit for bit (a test checks it)."""
    if "lam" in merge_kwargs:
        raise ValueError("lambda_sweep: give the scales as `lambdas`, not `lam`")
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("lambda_sweep: give at least one λ")
    runs = _runs(method, [None], seeds)
    name = _label(method, None, merge_kwargs)
    deltas = task_vectors(base, experts)
    frames = []
    with tqdm(total=len(runs) * len(lambdas), desc=f"{name} sweep", disable=not progress) as bar:
        for _, seed in runs:
            kwargs = dict(merge_kwargs, **({} if seed is None else {"seed": seed}))
            frames.append(scan_lambdas(evaluator, base, merged_delta(deltas, method, **kwargs), lambdas, split, tasks,
                                       label=name, seed=seed, bar=bar))
    return pd.concat(frames, ignore_index=True)


def pick_lambda(frame: pd.DataFrame, column: str = "lam") -> float:
    """Introduced in chapter 2: the value of ``column`` with the best mean accuracy over
    tasks (and seeds) in a sweep frame, by the book's one rule
    (:func:`~merging_helpers.evaluation.choose_lambda`: ties go to the smallest value).
    Choose on the validation split, report on test."""
    if frame.empty:
        raise ValueError("pick_lambda: the frame is empty")
    return choose_lambda(frame.groupby(column)["accuracy"].mean().to_dict())


def pruned_expert(base, expert, method, drop_rate, seed=0, **merge_kwargs):
    """Introduced in chapter 2: one expert with its delta pruned at ``drop_rate``,
    θ_b + prune(Δ) (``method``: "magnitude" or "dare_linear", any recipe works with one
    expert). The DARE mask of tensor ``name`` is the one ``recipes`` draws for
    (seed, name, expert index 0)."""
    return merge_state_dicts(base, [expert], method, drop_rate=drop_rate, seed=seed, lam=1.0, progress=False,
                             **merge_kwargs)


def pruning_curve(evaluator, zoo, task, method, drop_rates, seeds=(0, 1, 2), split="test", *, label=None,
                  progress=True, bar=None, **merge_kwargs) -> pd.DataFrame:
    """Introduced in chapter 2: accuracy of expert ``task`` on its own task as its delta
    is pruned at each of ``drop_rates`` with ``method`` ("magnitude" = top-k |Δ| per
    tensor, "dare_linear" = DARE, random drop + 1/(1 − p); pass ``rescale=`` to change
    it). Random methods are run once per seed. Returns columns
    ``method, drop_rate, seed, split, task, accuracy``."""
    return merge_grid(evaluator, zoo.base, {task: zoo.experts[task]}, method,
                      [{"drop_rate": float(p)} for p in drop_rates], seeds=seeds, split=split, tasks=[task],
                      label=label, progress=progress, bar=bar, lam=1.0, **merge_kwargs)


def pruning_curves(evaluator, zoo, methods, drop_rates, seeds=(0, 1, 2), split="test", tasks=None, *,
                   progress=True, **merge_kwargs) -> pd.DataFrame:
    """Introduced in chapter 2: :func:`pruning_curve` for every expert in ``tasks``
    (default: all) and every method in ``methods`` (recipe names, or a dict label →
    (recipe, extra merge kwargs)), with one progress bar. Same columns."""
    if not isinstance(methods, dict):
        methods = {m: (m, {}) for m in methods}
    tasks = list(tasks or zoo.task_names)
    total = sum(len(_runs(recipe, [None] * len(drop_rates), seeds)) for recipe, _ in methods.values()) * len(tasks)
    frames = []
    with tqdm(total=total, desc="pruning curves", disable=not progress) as bar:
        for task in tasks:
            for label, (recipe, extra) in methods.items():
                frames.append(pruning_curve(evaluator, zoo, task, recipe, drop_rates, seeds, split, label=label,
                                            bar=bar, **{**merge_kwargs, **extra}))
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def dare_layer_outputs(x, delta, drop_rate, n_masks=200, seed=0, rescale=True):
    """Introduced in chapter 2: the delta's contribution to a linear layer's output,
    (m ⊙ Δ) x, under ``n_masks`` random DARE keep masks m (drop rate p), rescaled by
    1/(1 − p) when ``rescale``. ``x``: (n, in) inputs, ``delta``: (out, in).
    Returns a tensor (n_masks, n, out); compare its mean over masks with ``x @ delta.T``.
    Mask j comes from ``torch.Generator().manual_seed(seed + j)`` via
    ``drop.random_keep_mask`` (kept where u >= p)."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"dare_layer_outputs: drop_rate must be in [0, 1), got {drop_rate}")
    x, delta = x.float(), delta.float()
    out = torch.empty(n_masks, x.shape[0], delta.shape[0])
    scale = 1.0 / (1.0 - drop_rate) if rescale else 1.0
    for j in range(n_masks):
        keep = random_keep_mask(delta, drop_rate, torch.Generator().manual_seed(seed + j))
        out[j] = (x @ (delta * keep).T * scale).cpu()
    return out


@torch.no_grad()
def rescale_factors(base, expert, drop_rate, seed=0, expert_index=0, min_numel=1) -> pd.DataFrame:
    """Introduced in chapter 2: for every floating tensor, DARE's rescale 1/(1 − p) and
    mergekit's L1 rescale ‖Δ‖₁ / ‖m ⊙ Δ‖₁ for the very mask ``recipes`` draws for
    (seed, tensor name, ``expert_index``). Returns columns ``name, numel, kept_fraction,
    inverse, l1, ratio`` (ratio = l1 / inverse; 1 means the two rescales agree).
    Tensors with fewer than ``min_numel`` entries or an all-zero delta are skipped."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"rescale_factors: drop_rate must be in [0, 1), got {drop_rate}")
    rows = []
    for name, b in base.items():
        if not b.is_floating_point() or b.numel() < min_numel:
            continue
        delta = expert[name].float() - b.float()
        keep = random_keep_mask(delta, drop_rate, EntryRandoms(seed, name, expert_index))
        kept_l1 = float((delta * keep).abs().sum())
        total_l1 = float(delta.abs().sum())
        if total_l1 == 0:
            continue
        inverse = 1.0 / (1.0 - drop_rate)
        l1 = total_l1 / kept_l1 if kept_l1 > 0 else math.nan
        rows.append({"name": name, "numel": b.numel(), "kept_fraction": float(keep.float().mean()),
                     "inverse": inverse, "l1": l1, "ratio": l1 / inverse})
    return pd.DataFrame(rows)


def seed_summary(frame: pd.DataFrame, by, percent: bool = True) -> pd.DataFrame:
    """Introduced in chapter 2: mean and standard deviation over seeds of each task's
    accuracy, plus a task ``"mean"`` (the mean over tasks, taken per seed first, so its
    std is the spread of the average). ``by``: the column(s) that name a setting (e.g.
    ``["method", "drop_rate"]``). Returns columns ``*by, task, mean, std, n_seeds``
    (in percent when ``percent``; std is NaN for a single run, e.g. a deterministic method)."""
    by = [by] if isinstance(by, str) else list(by)
    scale = 100.0 if percent else 1.0
    frame = frame.assign(accuracy=frame["accuracy"] * scale)
    per_seed_mean = (frame.groupby(by + ["seed"], dropna=False, sort=False)["accuracy"].mean()
                     .reset_index().assign(task="mean"))
    both = pd.concat([frame[by + ["seed", "task", "accuracy"]], per_seed_mean], ignore_index=True)
    out = (both.groupby(by + ["task"], dropna=False, sort=False)["accuracy"]
           .agg(mean="mean", std="std", n_seeds="count").reset_index())
    return out


def mean_std_table(summary: pd.DataFrame, by, digits: int = 1) -> pd.DataFrame:
    """Introduced in chapter 2: a wide table of ``"mean ± std"`` strings (one row per
    setting, one column per task, ``mean`` last) from :func:`seed_summary`'s output."""
    by = [by] if isinstance(by, str) else list(by)
    text = summary.apply(lambda r: f"{r['mean']:.{digits}f}" if pd.isna(r["std"])
                         else f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}", axis=1)
    wide = summary.assign(text=text).pivot(index=by, columns="task", values="text")
    tasks = [t for t in dict.fromkeys(summary["task"]) if t != "mean"] + ["mean"]
    return wide[tasks]
