"""Every method on the same experts, the same kept-parameter budget and the same tuning protocol.

Introduced in chapter 8. A :class:`Contender` is a method written as one function: the
experts' deltas, a budget (the kept fraction of every delta, or None for dense methods)
and a seed in; the merged delta at scale 1 out. :func:`tune_and_test` is the protocol
the chapter applies to all of them alike:

1. merge once per seed (random methods) or once (deterministic ones), timed (through the
   compiled kernel where it applies: the engine's tensors, bit for bit, :mod:`merging_helpers.fast.in_memory`);
2. score θ_b + λ·τ of the first seed's merge on the **validation** split for every λ of
   one shared grid — the only knob tuned, so no method wins by having more knobs (each
   method's own knobs are fixed at its chapter's choice, stated in :data:`CONTENDERS`;
   weight averaging alone keeps its λ = 1, since fixing the scale is what defines it);
   one seed chooses λ because scoring is what costs: a scan per seed would multiply the
   chapter's run time by the number of seeds;
3. take the λ with the best validation accuracy; while it lies on the edge of the scan, score
   one more step of the grid that way (chapter 3's widening rule, never λ ≤ 0), so that a grid
   above a method's optimum does not handicap it;
4. score that λ on the **test** split for every seed, keeping right/wrong per example.

The test scores of two contenders are then compared example by example
(:func:`merging_helpers.paired.paired_bootstrap`; a random method enters with the share
of its seeds that got each example right).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import apl, dppa, results
from .ablations import next_lambda
from .optional import require
from .deltas import apply_delta
from .methods import get_method
from .fast.in_memory import merge_state_dicts

LAMBDAS = (0.4, 0.7, 1.0, 1.3, 1.6)  # the one grid every method tunes on validation
BUDGETS = (0.1, 0.2, 0.5)            # kept fraction of every expert's delta
SEEDS = (0, 1, 2, 3, 4)


def _zero_like(delta):
    return {n: torch.zeros_like(t) for n, t in delta.items()}


def _engine(method: str, **options) -> Callable:
    """A recipe of the engine (chapters 2–3) as a contender's merge: merged on a zero base."""
    def merge(deltas, budget, seed):
        rate = {} if budget is None else {"density": budget}
        return merge_state_dicts(_zero_like(deltas[0]), deltas, method, seed=seed, progress=False, **rate, **options)
    return merge


def engine_contender(name: str, chapter: str, method: str, knobs: str = "", **options) -> "Contender":
    """A method of the engine's registry as a contender (chapter 8): whether it is random (a
    merge per seed) and whether it prunes to a budget are read from its record."""
    record = get_method(method)
    return Contender(name, chapter, _engine(method, **options), random=record.random,
                     budgeted=record.needs_rate, knobs=knobs)


def _dp(deltas, budget, seed):
    """DPPA's dynamic pruning (chapter 6, Eqs. 1–5; the registry's ``"dp"``): per-layer and per-map magnitude
    rates around α = 1 − budget, then Task Arithmetic's sum (the amplification's search is left out: see the chapter)."""
    return merge_state_dicts(_zero_like(deltas[0]), deltas, "dp", alpha=1.0 - budget, progress=False)


RMS_DROP_SCALE = 0.1  # the RMS rule's λ in units of 1/σ (chapter 7's reading) when no choice is passed


def rms_contender(drop_scale: float = RMS_DROP_SCALE) -> Contender:
    """RMS-adaptive drop rates around p = 1 − budget (chapter 7), distribution-aware, then
    elect + disjoint mean: λ = ``drop_scale`` in units of 1/σ (``scale="std"``), as chapter 7
    reads it; chapter 8 passes the λ chapter 7 chose on validation. (A raw λ of 0.1 would move
    rates by ~1e-5: the merge would be DARE-TIES.)"""
    if not drop_scale >= 0:
        raise ValueError(f"rms_contender: drop_scale (λ in units of 1/σ) must be >= 0, got {drop_scale}")

    def merge(deltas, budget, seed):
        with warnings.catch_warnings():  # how many rates were clipped is chapter 7's to report
            warnings.filterwarnings("ignore", message="adaptive_rates: .* drop rates were clipped")
            return merge_state_dicts(_zero_like(deltas[0]), deltas, "rms_adaptive", p_default=1.0 - budget,
                                     drop_scale=drop_scale, scale="std", seed=seed, progress=False)
    return Contender("RMS-adaptive", "07_rms_adaptive", merge, random=get_method("rms_adaptive").random,
                     knobs=f"λ = {drop_scale:g}/σ, aware")


@dataclass
class Contender:
    """One method of the comparison (chapter 8): ``merge(deltas, budget, seed) -> merged delta``."""

    name: str
    chapter: str
    merge: Callable
    random: bool = False
    budgeted: bool = True            # False: a dense method, the same at every budget
    prepare: Callable | None = None  # one-off work before merging (APL's importances), timed apart; it may
    #                                  return its cost in seconds (work shared with other contenders)
    knobs: str = ""                  # its own knobs, fixed (not tuned)
    tuned: bool = True               # False: λ = 1, no validation scan (weight averaging fixes its own scale)
    state: dict = field(default_factory=dict, repr=False)


def _average(deltas, budget, seed):
    """Weight averaging: θ_b + mean of the deltas, i.e. the mean of the experts (chapter 2)."""
    return {n: sum(d[n] for d in deltas) / len(deltas) for n in deltas[0]}


APL_IMPORTANCES = ("gradient", "causal")
APL_WEIGHTINGS = ("TA", "MI-TA")


class Importances:
    """Each expert's APL importances, computed once and shared by every APL contender built on
    them (chapters 8, 8b): the gradient at every level in ``gradient_levels`` from one backward
    pass per expert (chapter 5), each traced level once (chapter 4). :meth:`of` also returns what
    computing them took, so that a contender that reuses them reports the same preparation cost
    as one that computes them."""

    def __init__(self, scorer, base, experts: Mapping, few_shot: Mapping, gradient_levels=("layer",)):
        self.scorer, self.base, self.experts, self.few_shot = scorer, base, experts, few_shot
        self.gradient_levels = tuple(dict.fromkeys(gradient_levels))
        self.found: dict = {}  # (importance, expert, level) → (Importance, seconds of its computation)

    def _compute(self, importance: str, t: str, levels) -> None:
        if importance == "gradient":  # every level from one backward pass: one cost for all of them
            from .taylor import gradient_importances
            start = time.perf_counter()
            levels = tuple(dict.fromkeys((*self.gradient_levels, *levels)))
            found = gradient_importances(self.scorer, self.base, self.experts[t], t, self.few_shot[t], levels)
            seconds = time.perf_counter() - start
            self.found |= {("gradient", t, lv): (imp, seconds) for lv, imp in found.items()}
            return
        for level in levels:
            start = time.perf_counter()
            traced = apl.trace(self.scorer, self.base, self.experts[t], t, self.few_shot[t], level)
            self.found["causal", t, level] = (traced, time.perf_counter() - start)

    def of(self, importance: str, t: str, levels) -> tuple[dict, float]:
        """``({level: Importance}, seconds)`` of expert ``t`` (computed on first use)."""
        missing = [level for level in levels if (importance, t, level) not in self.found]
        if missing:
            self._compute(importance, t, missing)
        out = {level: self.found[importance, t, level][0] for level in levels}
        costs = [self.found[importance, t, level][1] for level in levels]
        return out, sum(costs) if importance == "causal" else max(costs)


def _apl_levels(weighting: str, level: str) -> tuple[str, ...]:
    """The importance levels an APL contender reads: its own, and the model's for MI-TA's weights."""
    return (level, "model") if weighting == "MI-TA" else (level,)


def apl_contender(scorer, base, experts: Mapping, few_shot: Mapping, importance: str = "gradient",
                  weighting: str = "TA", level: str = "layer", shared: Importances | None = None) -> Contender:
    """APL as a contender of chapter 8: ``level`` importances by causal tracing (chapter 4) or by
    the gradient (chapter 5), on Task Arithmetic or MI-Task Arithmetic (Eq. 12's expert weights
    from model-level importances, summing to T); ε = (1 − p)/2, τ = 5. ``shared``: importances
    computed once for several contenders (:func:`apl_contenders`), else its own."""
    if importance not in APL_IMPORTANCES:
        raise ValueError(f"APL contender: importance must be one of {APL_IMPORTANCES}, got {importance!r}")
    if weighting not in APL_WEIGHTINGS:
        raise ValueError(f"APL contender: weighting must be one of {APL_WEIGHTINGS}, got {weighting!r}")
    first = list(next(iter(few_shot.values())))
    per_label = len(first) // max(1, len({label for _, label in first}))
    chapter = "04_apl" if importance == "causal" else "05_gradient_importance"
    # gradient scores are loss changes, not P* − P: Eqs. 11 and 12 read them divided by their largest magnitude
    normalise = importance == "gradient"
    contender = Contender(f"APL ({importance}, {weighting})", chapter, None, random=get_method("apl").random,
                          knobs=f"{level} level, ε = (1 − p)/2, τ = 5, {per_label} shots per label"
                          + (", scores / max |score| (loss units)" if normalise else ""))
    names = list(experts)
    levels = _apl_levels(weighting, level)
    store = shared if shared is not None else Importances(scorer, base, experts, few_shot, levels)

    def prepare():
        found, seconds = {}, 0.0
        for t in names:
            found[t], cost = store.of(importance, t, levels)
            seconds += cost
        contender.state["importances"] = {t: found[t][level] for t in names}
        model = [float(found[t]["model"].values[0]) for t in names] if weighting == "MI-TA" else None
        if model is not None and normalise:
            largest = max(abs(x) for x in model) or 1.0
            model = [m / largest for m in model]
        contender.state["weights"] = apl.expert_weights(model, total=len(names)) if model is not None else None
        return seconds  # what computing its importances took, shared or not

    def merge(deltas, budget, seed):
        p = 1.0 - budget
        named = dict(zip(names, deltas))
        # apl.merge(zero, named, importances, p, (1 − p)/2, ...) with the fused kernel: the same tensors
        return merge_state_dicts(_zero_like(deltas[0]), named, "apl", importances=contender.state["importances"],
                                 drop_rate=p, eps=(1.0 - p) / 2, weights=contender.state["weights"],
                                 normalise=normalise, seed=seed, lam=1.0, progress=False)
    contender.prepare, contender.merge = prepare, merge
    return contender


APL_VARIANTS = (("gradient", "TA", "layer"), ("causal", "TA", "layer"), ("gradient", "MI-TA", "layer"))


def apl_contenders(scorer, base, experts: Mapping, few_shot: Mapping, variants=APL_VARIANTS,
                   shared: Importances | None = None) -> list[Contender]:
    """APL contenders, one per (importance, weighting, level) of ``variants``, on importances computed
    once for all of them (:class:`Importances`; ``shared``: a store the chapter has already read some
    importances from, e.g. to plot them); by default chapter 8's three: gradient on TA, causal on TA,
    gradient on MI-TA, at the layer level."""
    levels = [lv for i, w, level in variants if i == "gradient" for lv in _apl_levels(w, level)]
    if shared is None:
        shared = Importances(scorer, base, experts, few_shot, levels)
    elif any(a is not b for a, b in zip((shared.scorer, shared.base, shared.experts, shared.few_shot),
                                        (scorer, base, experts, few_shot))):
        raise ValueError("apl_contenders: the shared importances were computed for another scorer, base, experts "
                         "or few-shot sets than these")
    else:  # an expert not yet computed gets every level in one backward pass
        shared.gradient_levels = tuple(dict.fromkeys((*shared.gradient_levels, *levels)))
    return [apl_contender(scorer, base, experts, few_shot, i, w, level, shared) for i, w, level in variants]


CONTENDERS: dict[str, Contender] = {c.name: c for c in (
    Contender("weight averaging", "02_task_arithmetic_and_dare", _average, budgeted=False, tuned=False,
              knobs="λ = 1/T, not tuned"),
    engine_contender("Task Arithmetic", "02_task_arithmetic_and_dare", "task_arithmetic"),
    engine_contender("magnitude", "02_task_arithmetic_and_dare", "magnitude"),
    engine_contender("DARE", "02_task_arithmetic_and_dare", "dare_linear"),
    engine_contender("TIES", "03_ties", "ties"),
    engine_contender("DARE-TIES", "03_ties", "dare_ties"),
    engine_contender("DELLA", "03_ties", "della", knobs="ε = 0 (MagPrune, no band)", epsilon=0.0),
    Contender("DP (DPPA's pruning)", "06_dppa", _dp, random=get_method("dp").random,
              knobs=f"λ = {dppa.LAMBDA}, n = {dppa.N_SIGNIFICANT:g} (DPPA's defaults)"),
    rms_contender(),
)}


@dataclass
class Outcome:
    """One contender at one budget (chapter 8)."""

    name: str
    budget: float | None
    lam: float
    validation: dict          # λ → validation accuracy of the first seed's merge (mean over tasks, %)
    test_per_seed: list       # test accuracy per seed (mean over tasks, %)
    shares: dict              # task → share of seeds right, per test example
    merge_seconds: float      # per merge
    prepare_seconds: float
    evaluations: int
    seconds: float = 0.0        # wall time of the whole protocol for this outcome
    computed_here: bool = True  # False when read from the cache

    @property
    def test(self) -> float:
        return float(np.mean(self.test_per_seed))


def _lambdas(contender: Contender, lambdas: Sequence[float]) -> list[float]:
    return list(lambdas) if contender.tuned else [1.0]


MAX_LAMBDAS = 12  # a widened scan stops here (the outcome then says its λ is at the edge)


def _widen(validation: dict, score: Callable[[float], float], bar=None) -> float:
    """Chapter 3's widening scan on the grid's own step: while the best λ is the largest or the
    smallest scored, score one more step that way (never λ ≤ 0); returns the best λ (ties: the
    λ nearest 1). ``validation`` (λ → accuracy) is filled in place."""
    def best():
        return max(validation, key=lambda k: (validation[k], -abs(k - 1.0)))
    grid = sorted(validation)
    step = min(b - a for a, b in zip(grid, grid[1:])) if len(grid) > 1 else None
    lam = best()
    while step and len(validation) < MAX_LAMBDAS and (new := next_lambda(validation, lam, step)) is not None:
        validation[new] = score(new)
        if bar is not None:
            bar.total += 1
            bar.update(1)
        lam = best()
    return lam


def _mean_accuracy(scores: Mapping[str, float]) -> float:
    return 100 * float(np.mean(list(scores.values())))


def tune_and_test(evaluator, base, deltas: Sequence[Mapping], contender: Contender, budget: float | None,
                  lambdas: Sequence[float] = LAMBDAS, seeds: Sequence[int] = SEEDS, tasks=None,
                  bar=None) -> Outcome:
    """The chapter's protocol for one contender at one budget: merge (per seed), choose λ on
    validation (the first seed's merge), score the chosen λ on test for every seed (chapter 8)."""
    if not lambdas:
        raise ValueError("tune_and_test: give at least one λ")
    lambdas = _lambdas(contender, lambdas)
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"tune_and_test: budget is the kept fraction, in (0, 1], got {budget}")
    if contender.budgeted and budget is None:
        raise ValueError(f"{contender.name} prunes: give a budget (kept fraction)")
    started = time.perf_counter()
    seeds = list(seeds) if contender.random else [0]
    prepare_seconds = 0.0
    if contender.prepare is not None and not contender.state:
        start = time.perf_counter()
        reported = contender.prepare()
        prepare_seconds = time.perf_counter() - start if reported is None else reported
    merged, merge_seconds = [], 0.0
    for seed in seeds:
        start = time.perf_counter()
        merged.append(contender.merge(list(deltas), budget if contender.budgeted else None, seed))
        merge_seconds += time.perf_counter() - start
    def score(lam):  # the first seed's merge chooses λ
        return _mean_accuracy(evaluator.accuracy(apply_delta(base, merged[0], lam), "validation", tasks))

    validation = {}
    for lam in lambdas:
        validation[lam] = score(lam)
        if bar is not None:
            bar.update(1)
    lam = _widen(validation, score, bar)  # a best λ on the grid's edge widens the scan
    correct = [evaluator.correct(apply_delta(base, m, lam), "test", tasks) for m in merged]
    shares = {t: torch.stack([c[t].float() for c in correct]).mean(0).numpy() for t in correct[0]}
    test_per_seed = [100 * float(np.mean([c[t].float().mean() for t in c])) for c in correct]
    return Outcome(contender.name, budget if contender.budgeted else None, lam, validation, test_per_seed, shares,
                   merge_seconds / len(seeds), prepare_seconds, len(validation) + len(seeds),
                   time.perf_counter() - started)


@dataclass(frozen=True)
class Setting:
    """A group of experts to merge (chapter 8): a zoo tier and the tasks whose experts enter."""

    name: str
    tier: str = "light"
    tasks: tuple[str, ...] | None = None  # None: every task of the tier


SETTINGS = (  # APL's Table 5 pairs mirrored: topic + sentiment (similar), topic + arithmetic (dissimilar)
    Setting("light, 5 experts"),
    Setting("light, similar pair", tasks=("news", "sentiment")),
    Setting("light, dissimilar pair", tasks=("news", "compare")),
    Setting("light, 3 experts", tasks=("news", "sentiment", "compare")),
    Setting("heavy, 5 experts", tier="heavy"),
    Setting("LoRA, 5 experts", tier="lora"),
)


def experts_outcome(evaluator, experts: Mapping, tasks: Sequence[str]) -> Outcome:
    """Each task scored by its own fine-tuned expert, unmerged: the ceiling a merge is measured against (chapter 8)."""
    correct = {t: evaluator.correct(experts[t], "test", [t])[t] for t in tasks}
    shares = {t: c.float().numpy() for t, c in correct.items()}
    accuracy = 100 * float(np.mean([c.float().mean() for c in correct.values()]))
    return Outcome("fine-tuned experts", None, float("nan"), {}, [accuracy], shares, 0.0, 0.0, len(tasks))


def average_ranks(scores):
    """Mean rank of each method over blocks (chapter 8; Demšar 2006).

    ``scores``: a DataFrame with one row per block (a setting at a budget) and one column per
    method, higher is better. Within a block the best method ranks 1 and tied methods share
    their mean rank. Only methods measured in every block are ranked."""
    complete = scores.dropna(axis=1)
    if complete.shape[1] < 2:
        raise ValueError(f"average_ranks: need 2 or more methods scored in every block, got {list(complete.columns)}")
    return complete.rank(axis=1, ascending=False, method="average").mean().sort_values()


def critical_difference(methods: int, blocks: int, alpha: float = 0.05) -> float:
    """Nemenyi's critical difference of mean ranks (chapter 8; Demšar 2006, Eq. 5): two methods
    differ at level ``alpha`` when their mean ranks differ by more than q_α·√(k(k+1)/(6N)),
    q_α the studentized range quantile for k methods divided by √2."""
    studentized_range = require("scipy.stats", "critical_difference").studentized_range
    if methods < 2 or blocks < 1:
        raise ValueError(f"critical_difference: need ≥ 2 methods and ≥ 1 block, got {methods} and {blocks}")
    if not 0 < alpha < 1:
        raise ValueError(f"critical_difference: alpha in (0, 1), got {alpha}")
    q = studentized_range.ppf(1 - alpha, methods, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(methods * (methods + 1) / (6 * blocks)))


# ---- a cache of outcomes, so that a warm re-run of chapter 8 re-reads instead of re-merging -----------

def outcome_key(zoo_root, evaluator_splits: Mapping, contender: Contender, budget, lambdas, seeds, tasks) -> str:
    """What an outcome depends on: the zoo, the examples scored, the method, its settings, the code (chapter 8)."""
    blob = json.dumps({"zoo": str(zoo_root), "splits": evaluator_splits, "method": contender.name,
                       "knobs": contender.knobs, "budget": budget, "lambdas": _lambdas(contender, lambdas),
                       "seeds": list(seeds) if contender.random else [0], "tasks": tasks,
                       "code": results.code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _save(path, outcome: Outcome) -> None:
    payload = dataclasses.asdict(outcome)
    payload["shares"] = {t: [float(x) for x in v] for t, v in outcome.shares.items()}
    payload["validation"] = [[k, v] for k, v in outcome.validation.items()]
    results.write_json_atomically(path, payload)


def _load(path) -> Outcome:
    with open(path) as f:
        payload = json.load(f)
    payload["shares"] = {t: np.asarray(v) for t, v in payload["shares"].items()}
    payload["validation"] = {k: v for k, v in payload["validation"]}
    payload["computed_here"] = False
    return Outcome(**payload)


def run_comparison(evaluator, base, deltas, contenders: Sequence[Contender], budgets=BUDGETS,
                   lambdas=LAMBDAS, seeds=SEEDS, tasks=None, progress: bool = True, cache=None) -> list[Outcome]:
    """:func:`tune_and_test` for every contender at every budget (dense ones once) (chapter 8).

    ``cache``: a folder; each outcome is stored there as JSON under :func:`outcome_key` and
    read back instead of recomputed (None: no cache)."""
    runs = [(c, b) for c in contenders for b in (budgets if c.budgeted else [None])]
    splits = {t: {s: len(v) for s, v in task.splits.items()} for t, task in evaluator.zoo.tasks.items()}
    paths = {}
    if cache is not None:
        os.makedirs(cache, exist_ok=True)
        paths = {(c.name, b): os.path.join(cache, outcome_key(evaluator.zoo.root, splits, c, b, lambdas, seeds, tasks)
                                           + ".json") for c, b in runs}
    todo = [(c, b) for c, b in runs if not os.path.exists(paths.get((c.name, b), ""))]
    total = sum(len(_lambdas(c, lambdas)) for c, _ in todo)
    out = []
    with tqdm(total=total, desc="validation scans", disable=not progress) as bar:
        for contender, budget in runs:
            path = paths.get((contender.name, budget))
            if path and os.path.exists(path):
                out.append(_load(path))
                continue
            outcome = tune_and_test(evaluator, base, deltas, contender, budget, lambdas, seeds, tasks, bar)
            if path:
                _save(path, outcome)
            out.append(outcome)
    return out


def outcome_table(outcomes: Sequence[Outcome], reference: str = "Task Arithmetic"):
    """One row per (method, budget): chosen λ, test accuracy (mean ± std over seeds), the paired
    difference to ``reference`` with its bootstrap interval, and the cost (chapter 8)."""
    import pandas as pd
    from .paired import paired_bootstrap
    ref = next(o for o in outcomes if o.name == reference)
    rows = []
    for o in outcomes:
        diff = paired_bootstrap(ref.shares, o.shares)
        rows.append({"method": o.name, "kept": o.budget if o.budget is not None else 1.0, "λ": o.lam,
                     "test accuracy (%)": o.test,
                     "std over seeds": float(np.std(o.test_per_seed, ddof=1)) if len(o.test_per_seed) > 1 else 0.0,
                     f"− {reference} (points)": diff.difference, "95% CI low": diff.low, "95% CI high": diff.high,
                     "seeds": len(o.test_per_seed), "merge s": o.merge_seconds, "prepare s": o.prepare_seconds,
                     "evaluations": o.evaluations})
    return pd.DataFrame(rows)
