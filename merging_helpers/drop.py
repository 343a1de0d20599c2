"""Drop rules: which delta entries survive.

Introduced in chapter 2. Every rule returns a boolean *keep mask* (True = keep);
the random ones also return the keep probabilities when they vary per entry, so
that :mod:`merging_helpers.rescale` can undo the shrinkage.

Conventions: "drop rate" p is the fraction set to zero, "density" = 1 − p is the
fraction kept. Drop rates live in [0, 1) (p = 1 would leave nothing to rescale),
densities in (0, 1]. Magnitude pruning keeps k = round(density · n) entries (peft
uses int(), i.e. floor; the two agree whenever density · n is an integer).
"""
import torch

from .partitions import validate_rates
from .rng import EntryRandoms, uniform_like
from .selection import global_kth_largest_abs, top_k_mask


def _check_tensor(delta, what: str) -> None:
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"{what}: delta must be a torch.Tensor, got {type(delta).__name__}")


def magnitude_keep_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density · n) largest-|Δ| entries of one tensor (exactly that many;
    ties at the threshold go to the lowest flat indices, see ``selection``)."""
    _check_tensor(delta, "magnitude_keep_mask")
    validate_rates(density, "density")
    return top_k_mask(delta, round(density * delta.numel()))


def global_magnitude_threshold(deltas, density: float) -> float:
    """The |Δ| threshold that keeps a fraction ``density`` of the *whole model*
    (the TIES paper's choice), computed with histograms over all tensors.

    ``deltas``: a dict / list of tensors, or a callable returning a fresh iterable.
    Apply it with :func:`threshold_keep_mask` (keeps |Δ| >= threshold: at least k).
    """
    validate_rates(density, "density")
    return global_kth_largest_abs(deltas, fraction=density)


def threshold_keep_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries with |Δ| >= threshold (the "threshold drop" of small entries)."""
    _check_tensor(delta, "threshold_keep_mask")
    if not threshold >= 0:
        raise ValueError(f"threshold_keep_mask: threshold must be >= 0, got {threshold}")
    return delta.abs() >= threshold


def random_keep_mask(delta: torch.Tensor, drop_rate: float, generator) -> torch.Tensor:
    """DARE: drop each entry independently with probability ``drop_rate``.

    Entry i is kept when u_i >= drop_rate. Numbers come from ``generator`` on the CPU
    (see ``rng``), so the mask is the same on every device. With an ``EntryRandoms``
    (what the recipes use) the test is done on the 32-bit words, w_i >= ceil(p · 2^32),
    which is the same test as u_i >= p for u_i = w_i / 2^32 (``EntryRandoms.keep_mask``
    reads only the top byte of most words); with a ``torch.Generator``, u_i is
    ``torch.rand``'s float32.
    """
    _check_tensor(delta, "random_keep_mask")
    validate_rates(drop_rate, "drop_rate")
    if isinstance(generator, EntryRandoms):
        keep = generator.keep_mask(delta.numel(), drop_rate)
        return torch.from_numpy(keep).reshape(delta.shape).to(delta.device)
    return uniform_like(delta, generator) >= drop_rate


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities, ranking |Δ| within each row (dim 0 indexes rows;
    a 1-D tensor is one row):

        p_i = (density − ε) + ε · 2 · rank_i / (n − 1),  rank 0 = smallest |Δ|,

    so keep probabilities run from density − ε to density + ε and average ``density``.
    Ties in |Δ| are ranked by position (stable sort). This needs one sort per row.
    """
    _check_tensor(delta, "magprune_keep_prob")
    validate_rates(density, "density")
    if not (epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError(
            f"magprune: epsilon = {epsilon} must satisfy 0 <= epsilon, density - epsilon > 0 and "
            f"density + epsilon <= 1 (density = {density}), i.e. epsilon in [0, {min(density, 1 - density)}]"
        )
    rows = delta.detach().float().abs().reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full(delta.shape, float(density), device=delta.device)
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(rows).scatter_(1, order, torch.arange(n, dtype=rows.dtype, device=rows.device).expand_as(rows))
    return ((density - epsilon) + epsilon * 2 * ranks / (n - 1)).reshape(delta.shape)


def magprune_keep(delta: torch.Tensor, density: float, epsilon: float, generator):
    """DELLA MagPrune: returns ``(keep_mask, keep_prob)``; rescale kept entries by 1/keep_prob.
    Entry i is kept when u_i < keep_prob_i (with an ``EntryRandoms``, u_i = w_i / 2^32 in
    float64 and keep_prob_i is compared at its float32 value, exactly)."""
    keep_prob = magprune_keep_prob(delta, density, epsilon)
    return uniform_like(delta, generator) < keep_prob, keep_prob
