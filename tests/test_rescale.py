"""Rescales after a drop, by hand (merging_helpers.rescale, chapter 2)."""
import pytest
import torch
from conftest import bert_like, expert_of

from merging_helpers import recipes
from merging_helpers.recipes import merge_state_dicts
from merging_helpers.rescale import rescale_inverse_keep, rescale_l1_match


def test_rescale_factor_per_partition():
    base = bert_like()
    expert = expert_of(base, 1)
    factors = {"layer.0.ffn": 2.0}  # other partitions default to 1
    merged = merge_state_dicts(base, [expert], "magnitude", density=1.0, rescale="factor", rescale_factor=factors,
                               progress=False)
    for name in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.intermediate.dense.weight"):
        factor = 2.0 if "layer.0" in name else 1.0
        torch.testing.assert_close(merged[name], base[name] + factor * (expert[name] - base[name]))


def test_l1_and_inverse_rescale_by_hand():
    original = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = original * torch.tensor([0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(rescale_l1_match(original, kept), torch.tensor([0.0, -20 / 6, 0.0, -40 / 6]))
    torch.testing.assert_close(rescale_inverse_keep(kept, 0.5), torch.tensor([0.0, -4.0, 0.0, -8.0]))
    torch.testing.assert_close(rescale_l1_match(original, torch.zeros(4)), torch.zeros(4))  # nothing kept


def test_dare_l1_rescale_preserves_l1_norm(deltas):
    out = recipes.drop_and_rescale(deltas, "random", [0.3] * len(deltas), name="x", rescale="l1")
    for d, o in zip(deltas, out):
        assert o.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
        assert (o != 0).float().mean() < 0.4
