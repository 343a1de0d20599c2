"""Introduced in chapter 5: APL's gradient (Taylor) approximation of causal importance.

Putting partition s of an expert back to the base changes its few-shot loss. Around the
base θ_b, to first order, the change of L when the entries of a mask M are removed from
θ_t = θ_b + Δ is

    L(θ_t − M ⊙ Δ) − L(θ_t)  ≈  −Σ_i M_i Δ_i g_i,     g = ∇L(θ_b; D_t)     (APL Eqs. 9–10),

so one backward pass at the base scores every partition at once. The paper keeps
|Σ_{i∈s} Δ_i g_i| (larger = more important, the opposite sign convention of Eq. 5);
:func:`gradient_importance` returns it in Eq. 5's convention (more negative = more
important) so that :mod:`merging_helpers.apl` calibrates and merges with it unchanged.
``signed=True`` keeps the sign of Σ Δ_i g_i instead of the absolute value (negative: the
fine-tuning of s went down the loss, so removing s costs).

:func:`taylor_terms` gives the first- and second-order terms of L(θ_b + v) − L(θ_b) for
any step v (the second with one Hessian-vector product, never the Hessian), which is how
chapter 5 checks where the first order holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import apl
from .metrics import check_finite_gradient

NEAR_ZERO_LOSS = 1e-4  # below this few-shot loss at the base, gradient_importance warns


def partition_sums(values: Mapping[str, torch.Tensor], groups: Mapping[str, Mapping[str, int | None]]) -> torch.Tensor:
    """Σ_{i∈s} values_i for every partition s of ``groups`` (as :func:`apl.groups` returns
    them), in their order, float64 (chapter 5). Each tensor's row sums are taken once."""
    row_sums: dict[str, torch.Tensor] = {}

    def rows_of(name):
        if name not in row_sums:
            v = values[name].double().cpu()
            row_sums[name] = v.reshape(v.shape[0], -1).sum(1) if v.dim() else v.reshape(1)
        return row_sums[name]

    out = [sum((rows_of(n).sum() if row is None else rows_of(n)[row]) for n, row in group.items())
           for group in groups.values()]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in out])


def _check_pairs(delta, gradient, names, what):
    missing = [n for n in names if n not in delta or n not in gradient]
    if missing:
        raise KeyError(f"{what}: no delta or no gradient for {missing[:3]}")
    for name in names:
        if tuple(delta[name].shape) != tuple(gradient[name].shape):
            raise ValueError(f"{what}: {name!r} has delta shape {tuple(delta[name].shape)} but gradient "
                             f"shape {tuple(gradient[name].shape)}")
    check_finite_gradient({n: gradient[n] for n in names})


def partition_products(delta: Mapping[str, torch.Tensor], gradient: Mapping[str, torch.Tensor],
                       groups: Mapping[str, Mapping[str, int | None]]) -> torch.Tensor:
    """Σ_{i∈s} Δ_i g_i for every partition s of ``groups``, in their order, float64
    (chapter 5). Names a tensor the two dicts do not share, or whose shapes differ."""
    names = sorted({n for g in groups.values() for n in g})
    _check_pairs(delta, gradient, names, "partition_products")
    return partition_sums({n: delta[n].double().cpu() * gradient[n].double().cpu() for n in names}, groups)


def gradient_importances(scorer, base, expert, task: str, examples, levels=apl.LEVELS, head=None,
                         signed: bool = False) -> dict[str, apl.Importance]:
    """APL's gradient importance of ``expert``'s partitions at every level in ``levels``
    from one backward pass (chapter 5): the gradient g of the few-shot loss at the base
    (read by ``task``'s head, or ``head``), then −|Σ_{i∈s} Δ_i g_i| per partition (Eq. 5's
    convention; ``signed=True``: Σ Δ_i g_i). ``clean`` holds L(θ_b), where g was taken."""
    examples = list(examples)
    if not examples:
        raise ValueError(f"gradient_importance: the few-shot set of {task!r} is empty")
    levels = [apl._check_level(level) for level in ([levels] if isinstance(levels, str) else levels)]
    floating = {n for n, t in base.items() if t.is_floating_point()}
    delta = {n: expert[n].float() - base[n].float() for n in floating}
    gradient = scorer.loss_gradient(base, task, examples, head)
    with torch.no_grad():
        loss_at_base = float(scorer.loss(scorer.params(base), task, examples, head))
    if loss_at_base < NEAR_ZERO_LOSS:
        warnings.warn(f"the few-shot loss of {task!r} at the base is already {loss_at_base:.2e}: its gradient is "
                      "near zero and the gradient importances are uninformative", stacklevel=2)
    accuracy = apl._few_shot_accuracy(scorer, expert, task, examples, head)
    out = {}
    for level in levels:
        parts = apl.groups(expert, level)
        products = partition_products(delta, gradient, parts)
        out[level] = apl.Importance(task, level, list(parts), products if signed else -products.abs(), loss_at_base,
                                    accuracy, units="loss")
    return out


def gradient_importance(scorer, base, expert, task: str, examples, level: str, head=None,
                        signed: bool = False) -> apl.Importance:
    """:func:`gradient_importances` at one level (chapter 5)."""
    return gradient_importances(scorer, base, expert, task, examples, (level,), head, signed)[level]


def fisher_importances(scorer, base, expert, task: str, examples, levels=apl.LEVELS,
                       head=None) -> dict[str, apl.Importance]:
    """A diagonal-Fisher importance of every partition (chapter 5, beyond the paper):
    −Σ_n Σ_{i∈s} (Δ_i g_{n,i})², g_n the gradient of example n's loss at the base — one
    backward pass per few-shot example. Unlike |Σ Δ g| it cannot cancel across entries or
    examples. Eq. 5's convention (more negative = more important)."""
    examples = list(examples)
    if not examples:
        raise ValueError(f"fisher_importances: the few-shot set of {task!r} is empty")
    levels = [apl._check_level(level) for level in ([levels] if isinstance(levels, str) else levels)]
    floating = [n for n, t in base.items() if t.is_floating_point()]
    delta = {n: expert[n].float() - base[n].float() for n in floating}
    squares = {n: torch.zeros(delta[n].shape, dtype=torch.float64) for n in floating}
    for example in examples:
        gradient = scorer.loss_gradient(base, task, [example], head)
        _check_pairs(delta, gradient, floating, "fisher_importances")
        for n in floating:
            squares[n] += (delta[n].double() * gradient[n].double().cpu()) ** 2
    with torch.no_grad():
        loss_at_base = float(scorer.loss(scorer.params(base), task, examples, head))
    accuracy = apl._few_shot_accuracy(scorer, expert, task, examples, head)
    out = {}
    for level in levels:
        parts = apl.groups(expert, level)
        out[level] = apl.Importance(task, level, list(parts), -partition_sums(squares, parts), loss_at_base, accuracy,
                                    units="loss")
    return out


def taylor_terms(loss: Callable[[dict], torch.Tensor], at: Mapping[str, torch.Tensor],
                 step: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """First- and second-order terms of L(at + step) − L(at) (chapter 5): g·v and ½ vᵀHv,
    with H v from one forward-over-reverse product (``torch.func.jvp`` of ``torch.func.grad``;
    the Hessian is never formed). ``loss`` maps a parameter dict to a scalar tensor; names
    missing from ``step`` do not move."""
    at = dict(at)
    unknown = sorted(set(step) - set(at))
    if unknown:
        raise KeyError(f"taylor_terms: the step moves {unknown[:3]}, which are not parameters of the loss")
    tangent = {n: (step[n].to(t.dtype) if n in step else torch.zeros_like(t)) for n, t in at.items()}
    try:
        # torch's fused attention kernels have no forward-mode derivative: use the plain (math) one
        with sdpa_kernel(SDPBackend.MATH):
            gradient, hessian_step = torch.func.jvp(torch.func.grad(loss), (at,), (tangent,))
    except RuntimeError as err:  # torch.func checks the output itself: no extra forward pass to check it here
        if "Expected f(*args) to return" in str(err):
            raise ValueError(f"taylor_terms: the loss must be a scalar tensor ({err})") from err
        raise
    check_finite_gradient(gradient)
    first = sum(float((gradient[n].double() * tangent[n].double()).sum()) for n in at)
    second = 0.5 * sum(float((hessian_step[n].double() * tangent[n].double()).sum()) for n in at)
    return first, second


def removal_gaps(loss: Callable[[dict], torch.Tensor], base: Mapping[str, torch.Tensor],
                 delta: Mapping[str, torch.Tensor], masks: Mapping[str, Mapping[str, torch.Tensor]]) -> list[dict]:
    """Chapter 5's check of Eqs. 9–10. For each mask M (label → {name: 0/1 tensor}; names
    not in it are not removed): the actual change of the loss when the masked entries of
    θ_t = θ_b + Δ go back to the base, L(θ_b + Δ − M⊙Δ) − L(θ_b + Δ), and three predictions:

    * ``first``: the paper's, expanded at θ_b: −g·(M⊙Δ);
    * ``second``: the same expansion to second order, both losses around θ_b
      (:func:`taylor_terms` of Δ − M⊙Δ minus that of Δ): −g·m − mᵀHΔ + ½ mᵀHm, m = M⊙Δ;
    * ``first_at_expert``: first order around θ_t instead, −∇L(θ_t)·m.

    One Hessian-vector product per mask (plus one for Δ), never the Hessian."""
    base = dict(base)
    unknown = sorted({n for mask in masks.values() for n in mask} - set(delta))
    if unknown:
        raise KeyError(f"removal_gaps: masks name {unknown[:3]}, which have no delta")
    expert = {n: base[n] + delta[n] if n in delta else base[n] for n in base}
    first_full, second_full = taylor_terms(loss, base, delta)
    gradient_at_expert = torch.func.grad(loss)(expert)
    with torch.no_grad():
        loss_at_expert = float(loss(expert))
    rows = []
    for label, mask in masks.items():
        removed = {n: delta[n] * mask[n].to(delta[n].dtype) for n in mask}
        kept = {n: delta[n] - removed[n] if n in removed else delta[n] for n in delta}
        first, second = taylor_terms(loss, base, kept)
        with torch.no_grad():
            actual = float(loss({n: base[n] + kept[n] if n in kept else base[n] for n in base})) - loss_at_expert
        rows.append({"mask": label, "actual": actual, "first": first - first_full,
                     "second": first + second - first_full - second_full,
                     "first_at_expert": -sum(float((gradient_at_expert[n].double() * removed[n].double()).sum())
                                             for n in removed)})
    return rows
