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

from . import apl
from .evaluation import check_finite_gradient

NEAR_ZERO_LOSS = 1e-4  # below this few-shot loss at the base, gradient_importance warns


def partition_products(delta: Mapping[str, torch.Tensor], gradient: Mapping[str, torch.Tensor],
                       groups: Mapping[str, Mapping[str, int | None]]) -> torch.Tensor:
    """Σ_{i∈s} Δ_i g_i for every partition s of ``groups`` (as :func:`apl.groups` returns
    them), in their order, float64 (chapter 5). Names a tensor the two dicts do not share."""
    names = sorted({n for g in groups.values() for n in g})
    missing = [n for n in names if n not in delta or n not in gradient]
    if missing:
        raise KeyError(f"partition_products: no delta or no gradient for {missing[:3]}")
    for name in names:
        if tuple(delta[name].shape) != tuple(gradient[name].shape):
            raise ValueError(f"partition_products: {name!r} has delta shape {tuple(delta[name].shape)} but gradient "
                             f"shape {tuple(gradient[name].shape)}")
    check_finite_gradient({n: gradient[n] for n in names})
    row_sums: dict[str, torch.Tensor] = {}  # per tensor, Σ over each row (a vector), computed once

    def rows_of(name):
        if name not in row_sums:
            product = delta[name].double().cpu() * gradient[name].double().cpu()
            row_sums[name] = product.reshape(product.shape[0], -1).sum(1) if product.dim() else product.reshape(1)
        return row_sums[name]

    out = []
    for group in groups.values():
        out.append(sum((rows_of(n).sum() if row is None else rows_of(n)[row]) for n, row in group.items()))
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in out])


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
                                    accuracy)
    return out


def gradient_importance(scorer, base, expert, task: str, examples, level: str, head=None,
                        signed: bool = False) -> apl.Importance:
    """:func:`gradient_importances` at one level (chapter 5)."""
    return gradient_importances(scorer, base, expert, task, examples, (level,), head, signed)[level]


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
        gradient, hessian_step = torch.func.jvp(torch.func.grad(loss), (at,), (tangent,))
    except RuntimeError as err:  # torch.func checks the output itself: no extra forward pass to check it here
        if "Expected f(*args) to return" in str(err):
            raise ValueError(f"taylor_terms: the loss must be a scalar tensor ({err})") from err
        raise
    check_finite_gradient(gradient)
    first = sum(float((gradient[n].double() * tangent[n].double()).sum()) for n in at)
    second = 0.5 * sum(float((hessian_step[n].double() * tangent[n].double()).sum()) for n in at)
    return first, second
