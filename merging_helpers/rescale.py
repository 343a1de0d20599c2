"""Rescaling the kept delta entries after a drop.

Introduced in chapter 2. Dropping a fraction p of Δ shrinks the delta; DARE
multiplies the survivors by 1/(1 − p) so that every entry keeps its expected value,
E[(1 − m_i) Δ_i / (1 − p)] = Δ_i. Alternatives the book compares:

* ``"inverse"``: 1/(1 − p) (DARE paper, peft);
* ``"smallest"``: 1/(1 − min_t p_t), every expert by the smallest drop rate among the
  experts for that tensor (RMS-adaptive dropping, chapter 7);
* ``"l1"``: ‖Δ‖₁ / ‖kept‖₁, so the L1 norm of the tensor is unchanged (mergekit >= 0.1.0);
* ``"keep_prob"``: per entry 1/p_i (DELLA, whose keep probabilities vary);
* ``"factor"``: a given factor (e.g. one per partition, DPPA's amplification);
* ``None``: no rescale (APL Eq. 12, DPPA's dynamic pruning).
"""
import torch

from .partitions import PerColumn, PerRow, broadcast_rate

RESCALES = ("inverse", "smallest", "l1", "keep_prob", "factor", None)


def rescale_inverse_keep(delta_kept: torch.Tensor, drop_rate) -> torch.Tensor:
    """DARE: multiply by 1/(1 − drop_rate) (a float, or a PerRow / PerColumn vector) (chapter 2)."""
    if isinstance(drop_rate, (PerRow, PerColumn)):
        keep = 1.0 - broadcast_rate(drop_rate, delta_kept.shape, delta_kept.device)
        if not bool(((keep > 0) & (keep <= 1)).all()):
            raise ValueError("rescale_inverse_keep: every drop rate must be in [0, 1)")
        return delta_kept / keep.to(delta_kept.dtype)  # the float32 divisor of each row, as below
    if not 0 <= drop_rate < 1:
        raise ValueError(f"rescale_inverse_keep: drop_rate must be in [0, 1), got {drop_rate}")
    # divide by a tensor on the delta's device, not by a Python float: CUDA divides by a
    # scalar as a multiplication by its reciprocal (1 ulp off on some entries), which
    # would make GPU merges differ from CPU ones
    return delta_kept / torch.tensor(1.0 - drop_rate, dtype=delta_kept.dtype, device=delta_kept.device)


def rescale_l1_match(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale ``kept`` so that its L1 norm equals that of ``original`` (nothing kept → zeros) (chapter 2).
    The norms are whole-tensor sums in torch's own order, so on a GPU the factor may
    differ from the CPU's in the last bit (the other rescales give identical bits)."""
    kept_l1 = kept.abs().sum()
    if kept_l1 == 0:
        return kept
    return kept * (original.abs().sum() / kept_l1)


def rescale_by_keep_prob(kept: torch.Tensor, keep_prob: torch.Tensor) -> torch.Tensor:
    """DELLA: divide each kept entry by its own keep probability (chapter 2)."""
    if (keep_prob <= 0).any():
        raise ValueError("rescale_by_keep_prob: every keep probability must be > 0")
    return kept / keep_prob


def rescale_by_factor(kept: torch.Tensor, factor) -> torch.Tensor:
    """Multiply by a given factor (per partition: look it up with ``partitions.rate_for``;
    a PerRow / PerColumn vector scales each row / column) (chapter 2)."""
    if isinstance(factor, (PerRow, PerColumn)):
        return kept * broadcast_rate(factor, kept.shape, kept.device).to(kept.dtype)
    return kept * factor


def rescale(kept, how, *, original=None, drop_rate=None, keep_prob=None, factor=None):
    """Dispatch on ``how`` (one of ``RESCALES``) (chapter 2)."""
    if how in ("inverse", "smallest"):  # "smallest": the caller passes min_t p_t as drop_rate
        return rescale_inverse_keep(kept, drop_rate)
    if how == "l1":
        return rescale_l1_match(original, kept)
    if how == "keep_prob":
        return rescale_by_keep_prob(kept, keep_prob)
    if how == "factor":
        return rescale_by_factor(kept, factor)
    if how is None:
        return kept
    raise ValueError(f"rescale: how must be one of {RESCALES}, got {how!r}")
