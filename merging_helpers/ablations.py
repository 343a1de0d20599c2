"""Introduced in chapter 3: TIES, step by step, and its ablations on the zoo.

Nothing here is a new merge: every function composes the engine's parts
(:mod:`~merging_helpers.drop`, :mod:`~merging_helpers.consensus`,
:func:`~merging_helpers.recipes.merge_state_dicts`). What this module adds is

* :func:`ties_steps` — the intermediate results of TIES on a handful of entries, as a
  table a reader can follow entry by entry;
* :func:`merged_delta` — the merged task vector of any recipe at λ = 1, so that the
  scaling λ can be scanned by evaluation alone (θ = θ_b + λ · merged, no re-merge);
* :func:`scan_lambdas` / :func:`evaluate_variants` — choose λ on the validation split for
  each of several merges and score the chosen one on the test split, in the long-frame
  format of :mod:`~merging_helpers.sweeps` (chapter 2), whose ``pick_lambda`` and
  ``seed_summary`` they reuse;
* :func:`sign_conflicts` — how often the trimmed experts disagree in sign.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .consensus import agreement_mask, disjoint_merge, elect_sign, stack
from .deltas import apply_delta
from .drop import magnitude_keep_mask
from .recipes import merge_state_dicts
from .sweeps import RANDOM_METHODS, pick_lambda


def ties_steps(deltas, density: float, election: str = "total", expert_names: Sequence[str] | None = None):
    """Introduced in chapter 3: TIES on a small 1-D example, one row per entry.

    ``deltas``: T equally long 1-D tensors (or a T × n tensor). Columns: each expert's
    delta, its trimmed delta (top-k |Δ| kept, :func:`~merging_helpers.drop.magnitude_keep_mask`),
    the elected sign (:func:`~merging_helpers.consensus.elect_sign`), which experts agree
    with it, and the disjoint mean (:func:`~merging_helpers.consensus.disjoint_merge`).
    Returns ``(table, merged)`` with ``merged`` the last column as a tensor.
    """
    deltas = stack(deltas)
    if deltas.dim() != 2:
        raise ValueError(f"ties_steps: expected T 1-D deltas (a T × n tensor), got shape {tuple(deltas.shape)}")
    names = list(expert_names) if expert_names is not None else [f"E{t + 1}" for t in range(deltas.shape[0])]
    if len(names) != deltas.shape[0]:
        raise ValueError(f"ties_steps: {len(names)} expert names for {deltas.shape[0]} experts")
    trimmed = torch.stack([d * magnitude_keep_mask(d, density) for d in deltas])
    signs = elect_sign(trimmed, election)
    agree = agreement_mask(trimmed, signs)
    merged = disjoint_merge(trimmed, signs, "count")
    table = pd.DataFrame({f"Δ {n}": deltas[t].tolist() for t, n in enumerate(names)})
    for t, n in enumerate(names):
        table[f"trim {n}"] = trimmed[t].tolist()
    table["elected sign"] = ["+" if s > 0 else "−" for s in signs.tolist()]
    table["agree"] = [",".join(n for t, n in enumerate(names) if agree[t, i]) or "none" for i in range(deltas.shape[1])]
    table["merged"] = merged.tolist()
    table.index.name = "entry"
    return table, merged


def merged_delta(deltas, method: str, *, progress: bool = False, **merge_kwargs) -> dict:
    """Introduced in chapter 3: the merged task vector of ``method`` at λ = 1.

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
                 label: str = "merge", seed=None, progress: bool = False):
    """Introduced in chapter 3: score θ_b + λ · merged for every λ (merged once, by
    :func:`merged_delta`), instead of re-merging per λ as
    :func:`merging_helpers.sweeps.lambda_sweep` does.

    Returns the same long frame as ``sweeps.lambda_sweep`` (columns ``method, lam,
    seed, split, task, accuracy``, accuracy a fraction), so that
    :func:`~merging_helpers.sweeps.pick_lambda` and
    :func:`~merging_helpers.sweeps.seed_summary` apply; ``method`` is ``label``.
    """
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("scan_lambdas: give at least one λ")
    rows = []
    for lam in tqdm(lambdas, desc=f"λ ({label})", disable=not progress, leave=False):
        scores = evaluator.accuracy(apply_delta(base, merged, lam), split=split, tasks=tasks)
        rows += [{"method": label, "lam": lam, "seed": seed, "split": split, "task": task, "accuracy": float(acc)}
                 for task, acc in scores.items()]
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def evaluate_variants(evaluator, base: dict, deltas, variants: Mapping[str, tuple], seeds=(0, 1, 2),
                      choose_split: str = "validation", report_split: str = "test", progress: bool = True):
    """Introduced in chapter 3: merge, choose λ on ``choose_split``, report on ``report_split``.

    ``variants``: label → ``(method, merge_kwargs, lambdas)``. For each variant the
    merged delta is computed once (:func:`merged_delta`; once per seed in ``seeds`` for
    the random recipes of ``sweeps.RANDOM_METHODS``), every λ is scored on
    ``choose_split`` (:func:`scan_lambdas`), the λ with the best mean over tasks (and
    seeds) is picked (:func:`~merging_helpers.sweeps.pick_lambda`) and scored on
    ``report_split``. Returns ``(report, scans)``, two long frames in the format of
    ``sweeps`` (``method`` = the variant's label); ``report`` has the chosen λ in ``lam``
    and two extra columns: ``at_edge`` (True when λ is the smallest or largest of its
    grid: widen the grid before trusting that row) and ``merge_seconds`` (the time of
    that merge).
    """
    reports, scans = [], []
    for label, (method, kwargs, lambdas) in tqdm(variants.items(), desc="variants", disable=not progress):
        lambdas = [float(lam) for lam in lambdas]
        runs = list(seeds) if method in RANDOM_METHODS else [None]
        merged, seconds = {}, {}
        for seed in runs:
            start = time.perf_counter()
            merged[seed] = merged_delta(deltas, method, **kwargs, **({} if seed is None else {"seed": seed}))
            seconds[seed] = time.perf_counter() - start
            scans.append(scan_lambdas(evaluator, base, merged[seed], lambdas, choose_split, label=label, seed=seed))
        lam = pick_lambda(pd.concat([s for s in scans if s["method"].iloc[0] == label]))
        for seed in runs:
            report = scan_lambdas(evaluator, base, merged[seed], [lam], report_split, label=label, seed=seed)
            reports.append(report.assign(at_edge=len(lambdas) > 1 and lam in (min(lambdas), max(lambdas)),
                                         merge_seconds=seconds[seed]))
        del merged
    return pd.concat(reports, ignore_index=True), pd.concat(scans, ignore_index=True)


def sign_conflicts(deltas, density: float | None = None) -> float:
    """Introduced in chapter 3: among entries that at least two experts keep (after
    trimming each tensor to ``density``; None = no trim), the fraction where the kept
    deltas do not all have the same sign — the interference that sign election resolves.
    With ``density=None`` this is chapter 1's :func:`~merging_helpers.deltas.sign_disagreement`;
    trimming here is per tensor, one tensor at a time, so no trimmed model is held in memory."""
    deltas = list(deltas.values()) if isinstance(deltas, Mapping) else list(deltas)
    conflict = contested = 0
    for name in deltas[0]:
        kept = stack([d[name] if density is None else d[name] * magnitude_keep_mask(d[name], density) for d in deltas])
        signs = kept.sign()
        contested += int(((signs != 0).sum(0) >= 2).sum())
        conflict += int(((signs > 0).any(0) & (signs < 0).any(0)).sum())
    return conflict / contested if contested else 0.0
