"""Combining several (dropped, rescaled) deltas of one tensor into one.

Introduced in chapter 2 (:func:`weighted_sum`, Task Arithmetic) and chapter 3
(TIES: :func:`elect_sign` then :func:`disjoint_merge`).

Deltas are stacked along a new dim 0: ``deltas[t]`` is expert t's delta.

Two established implementations of TIES differ in *where the weights enter*:

* peft (``merge_utils.ties``/``dare_ties``): the sign is elected on the **unweighted**
  deltas; then each agreeing delta is multiplied by its weight and the sum is divided
  by the **number** of agreeing experts (``divide_by="count"``);
* mergekit (generalized task arithmetic): the sign is elected on the **weighted**
  deltas w_t Δ_t (``elect_sign(..., weights=w)``, the engine's ``weighted_election=True``);
  its ``ties`` and ``della`` then divide by the **sum of the weights** of the agreeing
  experts (``divide_by="weight_sum"``, mergekit's ``normalize: true``) while
  ``dare_ties`` just sums (``divide_by="nothing"``).

With equal weights of 1 all three divisions reduce to peft's, except ``"nothing"``.
Zero sign: an elected sign of 0 (the deltas cancel exactly, or all are 0) becomes
+1, as in peft and mergekit. Zero deltas never "agree" with any sign, so experts
that dropped an entry do not count in its mean.
"""
import torch

ELECTIONS = ("total", "frequency")
DIVISORS = ("count", "weight_sum", "nothing")
_OLD_DIVISORS = {"mean": "count", "weighted_mean": "weight_sum", "sum": "nothing"}  # names before the 2nd edition


def stack(deltas) -> torch.Tensor:
    """A list of equally shaped tensors → one float32 tensor with the experts on dim 0; float64
    stays float64 (a float64 model merges in float64) (chapter 3)."""
    def work(d):
        return d if d.dtype == torch.float64 else d.float()
    return work(deltas) if isinstance(deltas, torch.Tensor) else torch.stack([work(d) for d in deltas])


def sum_experts(x: torch.Tensor) -> torch.Tensor:
    """Σ_t x[t] over dim 0, added in expert order ((x[0] + x[1]) + x[2] ...) (chapter 3).

    ``x.sum(dim=0)`` picks its summation order by device and shape, so a GPU merge could
    round differently from a CPU one, and a TIES election near a zero sum could even
    change sign. A fixed order gives the same float32 result everywhere (and lets the
    streaming path cut tensors into chunks)."""
    total = x[0].clone()
    for row in x[1:]:
        total += row
    return total


def _weights_like(weights, deltas: torch.Tensor) -> torch.Tensor:
    """Weights (None → all 1) as a float32 tensor broadcastable against ``deltas``."""
    if weights is None:
        weights = [1.0] * deltas.shape[0]
    w = torch.as_tensor(weights, dtype=torch.float32, device=deltas.device).reshape(-1)
    if w.numel() != deltas.shape[0]:
        raise ValueError(f"weights: expected one weight per expert ({deltas.shape[0]}), got {w.numel()}")
    return w.reshape((-1,) + (1,) * (deltas.dim() - 1))


def weighted_sum(deltas, weights=None) -> torch.Tensor:
    """Task Arithmetic: Σ_t w_t Δ_t (weights default to 1) (chapter 3)."""
    deltas = stack(deltas)
    return sum_experts(deltas * _weights_like(weights, deltas))


def elect_sign(deltas, method: str = "total", weights=None) -> torch.Tensor:
    """TIES step 2: the elected sign γ ∈ {+1, −1} of every entry (chapter 3).

    ``"total"`` (the paper): γ = sign(Σ_t w_t Δ_t); ``"frequency"``: γ = sign(Σ_t sign(w_t Δ_t)).
    ``weights=None`` elects on unweighted deltas (peft); pass the weights to elect
    on weighted deltas (mergekit). A sum of exactly 0 elects +1.
    """
    if method not in ELECTIONS:
        raise ValueError(f"elect_sign: method must be one of {ELECTIONS}, got {method!r}")
    deltas = stack(deltas)
    if weights is not None:
        deltas = deltas * _weights_like(weights, deltas)
    votes = deltas if method == "total" else deltas.sign()
    return torch.where(sum_experts(votes) >= 0, 1.0, -1.0)


def agreement_mask(deltas, signs: torch.Tensor) -> torch.Tensor:
    """True where expert t's delta is nonzero and has the elected sign (chapter 3)."""
    return stack(deltas).sign() == signs


def disjoint_merge(deltas, signs: torch.Tensor, divide_by: str = "count", weights=None) -> torch.Tensor:
    """TIES step 3 (chapter 3): combine only the deltas that agree with the elected sign.

    Numerator Σ_{t agrees} w_t Δ_t, divided by
    ``"count"``: the number of agreeing experts (peft);
    ``"weight_sum"``: the sum of their weights (mergekit ``normalize``);
    ``"nothing"``: not divided (mergekit ``dare_ties``).
    Entries no expert agrees on (all dropped) stay 0. (The old names "mean",
    "weighted_mean" and "sum" are still understood.)
    """
    divide_by = _OLD_DIVISORS.get(divide_by, divide_by)
    if divide_by not in DIVISORS:
        raise ValueError(f"disjoint_merge: divide_by must be one of {DIVISORS}, got {divide_by!r}")
    deltas = stack(deltas)
    agree = agreement_mask(deltas, signs)
    w = _weights_like(weights, deltas)
    total = sum_experts(deltas * w * agree)
    if divide_by == "count":
        return total / sum_experts(agree.float()).clamp_min(1)
    if divide_by == "weight_sum":
        divisor = sum_experts(w * agree)
        return total / torch.where(divisor.abs() < 1e-8, 1.0, divisor)  # same guard as mergekit
    return total
