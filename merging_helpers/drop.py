"""Drop rules: which delta entries survive.

Introduced in chapter 2. Every rule returns a boolean *keep mask* (True = keep);
the random ones also return the keep probabilities when they vary per entry, so
that :mod:`merging_helpers.rescale` can undo the shrinkage.

Conventions: "drop rate" p is the fraction set to zero, "density" = 1 − p is the
fraction kept. A rate is a float, or a :class:`~merging_helpers.partitions.PerRow` /
``PerColumn`` vector (one rate per row / column, chapter 4): each row (column) then
gets exactly what a tensor made of that row alone would get at its own rate. Drop rates live in [0, 1) (p = 1 would leave nothing to rescale),
densities in (0, 1]. Magnitude pruning keeps k = round(density · n) entries (peft and
mergekit use int(), i.e. floor; the two agree whenever density · n is an integer; a
:class:`~merging_helpers.partitions.Floored` density keeps int(density · n), as they do).
"""
import torch

from .partitions import Floored, PerColumn, PerRow, broadcast_rate, validate_rates
from .rng import EntryRandoms, uniform_like
from .selection import global_kth_largest_abs, top_k_mask


def _check_tensor(delta, what: str) -> None:
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"{what}: delta must be a torch.Tensor, got {type(delta).__name__}")


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` entries a magnitude trim at ``density`` keeps (chapter 2): round(d · n), or
    int(d · n) for a :class:`~merging_helpers.partitions.Floored` density (mergekit's count, chapter 8's appendix)."""
    return int(density * n) if isinstance(density, Floored) else round(density * n)


BREADCRUMBS_GAMMA = 0.01  # breadcrumbs' outlier fraction when none is given (mergekit's default)


def breadcrumbs_keep_mask(delta: torch.Tensor, density, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2023; mergekit's ``breadcrumbs``, chapter 3's exercise):
    drop the int(γ · n) largest |Δ| as outliers and the smallest, keeping ``keep_count(density, n)``
    entries (fewer outliers go where density leaves no room for them, as in mergekit)."""
    _check_tensor(delta, "breadcrumbs_keep_mask")
    if isinstance(density, (PerRow, PerColumn)):
        raise ValueError("breadcrumbs takes one density per tensor, not per-row or per-column densities")
    n = delta.numel()
    keep = keep_count(density, n)
    top = min(int(gamma * n), n - keep)
    return top_k_mask(delta, keep + top) & ~top_k_mask(delta, top)


def magnitude_keep_mask(delta: torch.Tensor, density) -> torch.Tensor:
    """Keep the round(density · n) largest-|Δ| entries of one tensor (exactly that many;
    ties at the threshold go to the lowest flat indices, see ``selection``); with a
    PerRow / PerColumn density, the top-k of each row / column at its own density (chapter 2)."""
    _check_tensor(delta, "magnitude_keep_mask")
    validate_rates(density, "density")
    if isinstance(density, PerColumn):
        return magnitude_keep_mask(delta.transpose(0, 1), PerRow(density.values)).transpose(0, 1)
    if isinstance(density, PerRow):
        return torch.stack([magnitude_keep_mask(row, float(d)) for row, d in zip(delta, density.values)])
    return top_k_mask(delta, keep_count(density, delta.numel()))


def global_magnitude_threshold(deltas, density: float) -> float:
    """The |Δ| threshold that keeps a fraction ``density`` of the *whole model*
    (the TIES paper's choice), computed with histograms over all tensors (chapter 2).

    ``deltas``: a dict / list of tensors, or a callable returning a fresh iterable.
    Apply it with :func:`threshold_keep_mask` (keeps |Δ| >= threshold: at least k).
    """
    validate_rates(density, "density")
    return global_kth_largest_abs(deltas, fraction=density)


def threshold_keep_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries with |Δ| >= threshold (the "threshold drop" of small entries) (chapter 2)."""
    _check_tensor(delta, "threshold_keep_mask")
    if not threshold >= 0:
        raise ValueError(f"threshold_keep_mask: threshold must be >= 0, got {threshold}")
    return delta.abs() >= threshold


def random_keep_mask(delta: torch.Tensor, drop_rate, generator) -> torch.Tensor:
    """DARE: drop each entry independently with probability ``drop_rate`` (chapter 2).

    Entry i is kept when u_i >= drop_rate. Numbers come from ``generator`` on the CPU
    (see ``rng``), so the mask is the same on every device. With an ``EntryRandoms``
    (what the recipes use) the test is done on the 32-bit words, w_i >= ceil(p · 2^32),
    which is the same test as u_i >= p for u_i = w_i / 2^32 (``EntryRandoms.keep_mask``
    reads only the top byte of most words); with a ``torch.Generator``, u_i is
    ``torch.rand``'s float32. A PerRow / PerColumn ``drop_rate`` gives each entry its row's / column's rate.
    """
    _check_tensor(delta, "random_keep_mask")
    validate_rates(drop_rate, "drop_rate")
    if isinstance(drop_rate, (PerRow, PerColumn)):
        rates = broadcast_rate(drop_rate, delta.shape).expand(delta.shape).reshape(-1).numpy()
        if isinstance(generator, EntryRandoms):
            keep = generator.keep_mask_per_entry(rates)
            return torch.from_numpy(keep).reshape(delta.shape).to(delta.device)
        return uniform_like(delta, generator) >= torch.from_numpy(rates).reshape(delta.shape).float().to(delta.device)
    if isinstance(generator, EntryRandoms):
        keep = generator.keep_mask(delta.numel(), drop_rate)
        return torch.from_numpy(keep).reshape(delta.shape).to(delta.device)
    return uniform_like(delta, generator) >= drop_rate


def magprune_keep_prob(delta: torch.Tensor, density, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities, ranking |Δ| within each row (dim 0 indexes rows;
    a 1-D tensor is one row; chapter 3):

        p_i = (density − ε) + ε · 2 · rank_i / (n − 1),  rank 0 = smallest |Δ|,

    so keep probabilities run from density − ε to density + ε and average ``density``.
    Ties in |Δ| are ranked by position (stable sort). This needs one sort per row (none for ε = 0).
    A PerRow / PerColumn density sets the mean keep probability of each row / column.
    """
    _check_tensor(delta, "magprune_keep_prob")
    validate_rates(density, "density")
    d = density.values.double() if isinstance(density, (PerRow, PerColumn)) else torch.tensor(float(density))
    lo_d, hi_d = float(d.min()) if d.numel() else 0.5, float(d.max()) if d.numel() else 0.5
    if not (epsilon >= 0 and lo_d - epsilon > 0 and hi_d + epsilon <= 1):
        raise ValueError(
            f"magprune: epsilon = {epsilon} must satisfy 0 <= epsilon, density - epsilon > 0 and "
            f"density + epsilon <= 1 (density in [{lo_d}, {hi_d}]), i.e. epsilon in [0, {min(lo_d, 1 - hi_d)}]"
        )
    if delta.numel() == 0:
        return torch.zeros(delta.shape, device=delta.device)
    # (density − ε) rounded to float32 once, as when it is a Python float added to a float32 tensor
    start = broadcast_rate(density, delta.shape, delta.device)
    start = (start - epsilon).float() if isinstance(start, torch.Tensor) else density - epsilon
    rows = delta.detach().float().abs().reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
    n = rows.shape[1]
    if n == 1:  # one entry per row: it keeps its row's density
        if isinstance(density, (PerRow, PerColumn)):
            return broadcast_rate(density, delta.shape, delta.device).float().expand(delta.shape).clone()
        return torch.full(delta.shape, float(density), device=delta.device)
    if epsilon == 0:  # no band: every rank gets the same probability, so no sort is needed (the same bits)
        ranks = torch.zeros_like(rows)
    else:
        order = torch.argsort(rows, dim=1, stable=True)
        ranks = torch.empty_like(rows).scatter_(1, order, torch.arange(n, dtype=rows.dtype,
                                                                       device=rows.device).expand_as(rows))
    return (start + (epsilon * 2 * ranks / (n - 1)).reshape(delta.shape)).reshape(delta.shape)


def magprune_keep(delta: torch.Tensor, density, epsilon: float, generator):
    """DELLA MagPrune: returns ``(keep_mask, keep_prob)``; rescale kept entries by 1/keep_prob (chapter 2).
    Entry i is kept when u_i < keep_prob_i (with an ``EntryRandoms``, u_i = w_i / 2^32 in
    float64 and keep_prob_i is compared at its float32 value, exactly)."""
    keep_prob = magprune_keep_prob(delta, density, epsilon)
    return uniform_like(delta, generator) < keep_prob, keep_prob
