"""Introduced in chapter 6: AdaMerging — merge coefficients learned without labels.

θ = θ_b + Σ_t Σ_g λ_t^g Δ_t^g: one coefficient per expert t and partition g (Yang et al.
2023; DPPA merges its pruned experts with it). The λ are learned by minimising the
Shannon entropy of the merged model's predictions on *unlabeled* inputs of every task
(Adam, λ clipped to [0, 1] after each step, as in the authors' code). It is test-time
adaptation: it reads the test inputs (never their labels), which Task Arithmetic with λ
chosen on validation does not — the chapter says so wherever the two are compared.

``level`` picks the partitions (``partitions.LEVELS``): ``"model"`` is task-wise
AdaMerging (one λ per expert), ``"tensor"`` (default) is the authors' "layer-wise" code,
which learns one λ per parameter tensor, and ``"layer"`` one per transformer block.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .options import options_from
from .partitions import LEVELS, partition_key


class AdaMerging(NamedTuple):
    """The learned coefficients (expert → partition → λ) and the entropy path (chapter 6)."""

    coefficients: dict[str, dict[str, float]]
    entropy: list[float]  # Σ_tasks mean entropy of each step's batch, before that step's update
    initial_entropy: float  # Σ_tasks mean entropy on all the inputs, at the initial λ
    final_entropy: float  # the same at the learned λ


def _check(deltas, base, level, steps, lr, init, batch_size) -> list[str]:
    if level not in LEVELS:
        raise ValueError(f"adamerging: level must be one of {LEVELS}, got {level!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"adamerging: steps must be an int ≥ 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"adamerging: lr must be > 0, got {lr!r}")
    if not 0.0 <= init <= 1.0:
        raise ValueError(f"adamerging: init must be in [0, 1] (λ is clipped there), got {init!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"adamerging: batch_size must be an int ≥ 1, got {batch_size!r}")
    if not deltas:
        raise ValueError("adamerging: no experts to merge")
    names = sorted(next(iter(deltas.values())))
    for t, delta in deltas.items():
        if sorted(delta) != names:
            other = sorted(set(delta) ^ set(names))
            raise KeyError(f"adamerging: expert {t!r} has other tensors than the first expert (e.g. {other[:3]})")
        for n in names:
            if n not in base:
                raise KeyError(f"adamerging: tensor {n!r} of expert {t!r} is not in the base")
            if delta[n].shape != base[n].shape:
                raise ValueError(f"adamerging: expert {t!r}'s delta {n!r} has shape {tuple(delta[n].shape)}, "
                                 f"the base's is {tuple(base[n].shape)}")
    return names


def merged_params(base: Mapping[str, torch.Tensor], stacked: Mapping[str, torch.Tensor],
                  coefficients: torch.Tensor, group_of: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """θ_b + Σ_t λ_t^{g(n)} Δ_t[n] for every tensor n, differentiable in ``coefficients``
    (a T × G tensor); ``stacked[n]`` is the T experts' deltas of n stacked (chapter 6)."""
    out = dict(base)
    for n, deltas in stacked.items():
        lam = coefficients[:, group_of[n]].to(deltas.dtype)
        out[n] = base[n] + torch.tensordot(lam, deltas, dims=1)
    return out


def merge(base: Mapping[str, torch.Tensor], deltas: Mapping[str, Mapping[str, torch.Tensor]],
          coefficients: Mapping[str, Mapping[str, float]], level: str = "tensor") -> dict[str, torch.Tensor]:
    """The merged state dict for learned (or given) coefficients, in the base's dtypes (chapter 6)."""
    out = {n: t.clone() for n, t in base.items()}
    for t, delta in deltas.items():
        for n, d in delta.items():
            lam = coefficients[t][partition_key(n, level)]
            out[n] = (out[n].float() + lam * d.float()).to(base[n].dtype)
    return out


def _pools(inputs: Mapping[str, list], batch_size: int, seed: int) -> dict[str, list[list[str]]]:
    pools = {}
    for task, texts in inputs.items():
        texts = [t[0] if isinstance(t, (tuple, list)) else t for t in texts]  # (text, label): the label is dropped
        if not texts:
            raise ValueError(f"adamerging: task {task!r} has no unlabeled inputs")
        texts = list(texts)
        random.Random(seed).shuffle(texts)
        pools[task] = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    return pools


@dataclass(frozen=True)
class AdaMergingOptions:
    """AdaMerging's knobs (chapter 6): one coefficient per expert and ``level`` partition, ``steps``
    Adam steps at ``lr`` from ``init``, ``batch_size`` inputs per task and step, the scoring
    ``heads`` (task → head; default the zoo's), the shuffle's ``seed``, a progress bar."""

    level: str = "tensor"
    steps: int = 100
    lr: float = 1e-3
    init: float = 0.3
    batch_size: int = 16
    heads: Mapping | None = None
    seed: int = 0
    progress: bool = True


def adamerging(scorer, base: Mapping[str, torch.Tensor], deltas: Mapping[str, Mapping[str, torch.Tensor]],
               inputs: Mapping[str, list], options: AdaMergingOptions | None = None, **given) -> AdaMerging:
    """Learn AdaMerging's coefficients (chapter 6); the knobs of :class:`AdaMergingOptions` as an
    object or by name (``steps=50, lr=0.01``).

    ``deltas``: expert name → task vector; ``inputs``: task → unlabeled texts (or (text, label)
    pairs, whose labels are ignored) — one entry per task whose entropy is minimised, each
    scored with its own head (``heads[task]``, default the zoo's). Every step takes the next
    ``batch_size`` inputs of every task (a seeded shuffle, cycled), sums the tasks' mean
    entropies and takes one Adam step on the coefficients, then clips them to [0, 1].
    """
    o = options_from(AdaMergingOptions, options, given, "adamerging")
    level, steps, lr, init, batch_size, heads, seed, progress = (o.level, o.steps, o.lr, o.init, o.batch_size,
                                                                 o.heads, o.seed, o.progress)
    names = _check(deltas, base, level, steps, lr, init, batch_size)
    pools = _pools(inputs, batch_size, seed)  # checked before the deltas are stacked
    experts = list(deltas)
    keys = sorted({partition_key(n, level) for n in names})
    group_of = {n: keys.index(partition_key(n, level)) for n in names}
    device = scorer.device
    base_p = scorer.params(base)
    stacked = {n: torch.stack([deltas[t][n].to(device, torch.float32) for t in experts]) for n in names}
    coefficients = torch.full((len(experts), len(keys)), float(init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    heads = heads or {}

    def total_entropy(batch_of):
        params = merged_params(base_p, stacked, coefficients, group_of)
        return sum(scorer.entropy(params, task, batch_of(task), heads.get(task)) for task in pools)

    def everything(task):
        return [t for chunk in pools[task] for t in chunk]

    with torch.no_grad():
        initial = float(total_entropy(everything))
    history = []
    for step in tqdm(range(steps), desc="AdaMerging", disable=not progress, leave=False):
        loss = total_entropy(lambda task: pools[task][step % len(pools[task])])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            coefficients.clamp_(0.0, 1.0)
        history.append(float(loss.detach()))
    with torch.no_grad():
        final = float(total_entropy(everything))
    learned = coefficients.detach().cpu()
    return AdaMerging({t: {k: float(learned[i, j]) for j, k in enumerate(keys)} for i, t in enumerate(experts)},
                      history, initial, final)
