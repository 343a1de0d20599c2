"""Introduced in chapter 3: TIES, step by step, and its ablations on the zoo.

Nothing here is a new merge: every function composes the engine's parts
(:mod:`~merging_helpers.drop`, :mod:`~merging_helpers.consensus`,
:func:`~merging_helpers.recipes.merge_state_dicts`). What this module adds is

* :func:`ties_steps` — the intermediate results of TIES on a handful of entries, as a
  table a reader can follow entry by entry;
* :func:`evaluate_variants` — choose λ on the validation split for each of several
  merges and score the chosen one on the test split, in the long-frame format of
  :mod:`~merging_helpers.sweeps` (chapter 2), whose ``merged_delta``, ``scan_lambdas``,
  ``pick_lambda`` and ``seed_summary`` it reuses (the first two are importable from here
  too);
* :func:`sign_conflicts` — how often the trimmed experts disagree in sign.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .consensus import agreement_mask, disjoint_merge, elect_sign, stack
from .drop import magnitude_keep_mask
from .evaluation import LAMBDA_STEP
from .sweeps import RANDOM_METHODS, merged_delta, pick_lambda, scan_lambdas  # noqa: F401 (re-exported: chapter 3 names)


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


def next_lambda(scored, lam: float, step: float = LAMBDA_STEP) -> float | None:
    """Introduced in chapter 3: where to widen a λ scan — one ``step`` beyond the best λ
    when it is the largest or the smallest λ scored so far (never to λ ≤ 0), else None."""
    if lam == max(scored):
        return round(lam + step, 6)
    if lam == min(scored) and round(lam - step, 6) > 0:
        return round(lam - step, 6)
    return None


def evaluate_variants(evaluator, base: dict, deltas, variants: Mapping[str, tuple], seeds=(0, 1, 2),
                      choose_split: str = "validation", report_split: str = "test", progress: bool = True,
                      widen: bool = True, max_lambdas: int = 20):
    """Introduced in chapter 3: merge, choose λ on ``choose_split``, report on ``report_split``.

    ``variants``: label → ``(method, merge_kwargs, lambdas)``. For each variant the
    merged delta is computed once (:func:`merged_delta`; once per seed in ``seeds`` for
    the random recipes of ``sweeps.RANDOM_METHODS``), every λ is scored on
    ``choose_split`` (:func:`scan_lambdas`) and the λ with the best mean over tasks (and
    seeds) is picked (:func:`~merging_helpers.sweeps.pick_lambda`). With ``widen``, while
    that λ is the largest or smallest scored, the scan goes one more rung of the book's λ
    ladder that way (:func:`next_lambda`), up to ``max_lambdas`` values; the choice still
    depends on ``choose_split`` only. The chosen λ is scored on ``report_split``.
    Returns ``(report, scans)``, two long frames in the format of ``sweeps`` (``method``
    = the variant's label); ``report`` has the chosen λ in ``lam`` and two extra columns:
    ``at_edge`` (True when λ is still the smallest or largest scored: do not trust that
    row) and ``merge_seconds`` (the time of that merge).
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
        while widen and len(lambdas) < max_lambdas and (step := next_lambda(lambdas, lam)) is not None:
            lambdas.append(step)
            for seed in runs:
                scans.append(scan_lambdas(evaluator, base, merged[seed], [step], choose_split, label=label, seed=seed))
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
