"""Sign election and disjoint merge, against peft's merge_utils and by hand (merging_helpers.consensus, chapter 3)."""
import pytest
import torch
from peft.utils import merge_utils as peft

from merging_helpers import recipes
from merging_helpers.consensus import agreement_mask, disjoint_merge, elect_sign, weighted_sum


def test_majority_sign_and_disjoint_merge_match_peft():
    # columns: exact cancellation (elects +1), all zero, a 2-vs-1 vote, a dropped entry
    stacked = torch.tensor([[1.0, 0.0, 3.0, 0.0, -1.0], [-1.0, 0.0, -1.0, 2.0, -1.0], [0.0, 0.0, -1.0, -5.0, 4.0]])
    for method in ("total", "frequency"):
        signs = elect_sign(stacked, method)
        assert signs[0] == 1 and signs[1] == 1  # 0 → +1
        assert torch.equal(agreement_mask(stacked, signs), peft.calculate_majority_sign_mask(stacked, method))
        torch.testing.assert_close(
            disjoint_merge(stacked, signs, "mean"), peft.disjoint_merge(stacked, peft.calculate_majority_sign_mask(stacked, method))
        )
    assert elect_sign(stacked, "total")[2] == 1 and elect_sign(stacked, "frequency")[2] == -1


# one entry, three experts: Δ = (1.0, −0.75, −0.25), w = (0.5, 1, 2) (all exact in float32)
HAND = [torch.tensor([1.0]), torch.tensor([-0.75]), torch.tensor([-0.25])]


HAND_W = [0.5, 1.0, 2.0]


def test_peft_style_election_is_unweighted():
    # unweighted sum 1 − 0.75 − 0.25 = 0 → +1 (zero elects +); only expert 0 agrees: 0.5 · 1.0 / 1 expert
    assert recipes.ties(HAND, densities=[1.0] * 3, weights=HAND_W, weighted_election=False).item() == pytest.approx(0.5)


def test_mergekit_style_election_is_weighted():
    # weighted sum 0.5 − 0.75 − 0.5 = −0.75 → −1; experts 1, 2 agree: −0.75 − 0.5 = −1.25
    #   ties (normalize): / (1 + 2) = −0.4167;  dare_ties (sum): −1.25;  mean over 2 experts: −0.625
    ties = recipes.ties(HAND, densities=[1.0] * 3, weights=HAND_W, weighted_election=True)
    assert ties.item() == pytest.approx(-1.25 / 3)
    dare_ties = recipes.dare_ties(HAND, densities=[1.0] * 3, weights=HAND_W, weighted_election=True)
    assert dare_ties.item() == pytest.approx(-1.25)
    assert recipes.ties(HAND, densities=[1.0] * 3, weights=HAND_W, weighted_election=True, divide_by="count").item() == pytest.approx(-0.625)


def test_frequency_election_counts_signs():
    # signs (+, −, −) → −1 although the (unweighted) total is 0 → +1; mean of −0.75·1 and −0.25·2
    out = recipes.ties(HAND, densities=[1.0] * 3, weights=HAND_W, election="frequency")
    assert out.item() == pytest.approx(-0.625)


def test_expert_sums_are_added_in_expert_order():
    from merging_helpers.consensus import sum_experts

    x = torch.tensor([[1e8], [1.0], [-1e8]])  # float32: (1e8 + 1) rounds back to 1e8
    assert sum_experts(x).item() == 0.0  # ((1e8 + 1) - 1e8); another order would give 1
    assert weighted_sum(x).item() == 0.0
    assert sum_experts(x[[0, 2, 1]]).item() == 1.0
