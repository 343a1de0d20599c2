"""The merge engine against peft's merge_utils (where the semantics coincide) and
hand-worked cases (where they differ on purpose: mergekit-style election, L1 rescale)."""
import pytest
import torch
from peft.utils import merge_utils as peft

from merging_helpers import recipes
from merging_helpers.consensus import agreement_mask, disjoint_merge, elect_sign, weighted_sum
from merging_helpers.drop import magnitude_keep_mask, random_keep_mask
from merging_helpers.rescale import rescale_inverse_keep, rescale_l1_match
from merging_helpers.rng import EntryRandoms

T, SHAPE = 3, (40, 25)  # 1000 entries: density · n is an integer for the densities below
WEIGHTS = [0.5, 1.0, 2.0]


@pytest.fixture
def deltas():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(SHAPE, generator=g) for _ in range(T)]


def test_task_arithmetic_matches_peft(deltas):
    expected = peft.task_arithmetic(deltas, torch.tensor(WEIGHTS))
    torch.testing.assert_close(recipes.task_arithmetic(deltas, weights=WEIGHTS), expected)
    torch.testing.assert_close(weighted_sum(deltas, WEIGHTS), expected)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_magnitude_prune_matches_peft(deltas, density):
    torch.testing.assert_close(deltas[0] * magnitude_keep_mask(deltas[0], density), peft.prune(deltas[0], density, "magnitude"))
    expected = peft.magnitude_prune(deltas, torch.tensor(WEIGHTS), density)
    torch.testing.assert_close(recipes.magnitude(deltas, densities=[density] * T, weights=WEIGHTS), expected)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("density", [0.2, 0.7, 1.0])
def test_ties_matches_peft(deltas, method, density):
    expected = peft.ties(deltas, torch.tensor(WEIGHTS), density, majority_sign_method=method)
    ours = recipes.ties(deltas, densities=[density] * T, weights=WEIGHTS, election=method, weighted_election=False)
    torch.testing.assert_close(ours, expected)


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


@pytest.fixture
def same_masks_in_peft(monkeypatch):
    """Make peft's torch.bernoulli return *our* DARE keep masks, one per call, in
    expert order; everything else (multiply, /density, weights, election) is peft's."""
    def install(deltas, density, name, seed):
        masks = [random_keep_mask(d, 1.0 - density, EntryRandoms(seed, name, t)).float() for t, d in enumerate(deltas)]
        calls = iter(masks)
        monkeypatch.setattr(torch, "bernoulli", lambda probs: next(calls))
        return masks
    return install


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_dare_linear_matches_peft_with_same_mask(deltas, same_masks_in_peft, density):
    same_masks_in_peft(deltas, density, "w", seed=7)
    expected = peft.dare_linear(deltas, torch.tensor(WEIGHTS), density)
    ours = recipes.dare_linear(deltas, densities=[density] * T, weights=WEIGHTS, name="w", seed=7)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_matches_peft_with_same_mask(deltas, same_masks_in_peft, method):
    masks = same_masks_in_peft(deltas, 0.3, "w", seed=3)
    expected = peft.dare_ties(deltas, torch.tensor(WEIGHTS), 0.3, majority_sign_method=method)
    ours = recipes.dare_ties(deltas, densities=[0.3] * T, weights=WEIGHTS, name="w", seed=3, election=method)
    torch.testing.assert_close(ours, expected)
    assert 0.25 < masks[0].mean() < 0.35  # the masks really drop ~70 %


# ---- semantics that differ from peft on purpose: pinned by hand-worked cases ----------

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


def test_l1_and_inverse_rescale_by_hand():
    original = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = original * torch.tensor([0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(rescale_l1_match(original, kept), torch.tensor([0.0, -20 / 6, 0.0, -40 / 6]))
    torch.testing.assert_close(rescale_inverse_keep(kept, 0.5), torch.tensor([0.0, -4.0, 0.0, -8.0]))
    torch.testing.assert_close(rescale_l1_match(original, torch.zeros(4)), torch.zeros(4))  # nothing kept


def test_dare_l1_rescale_preserves_l1_norm(deltas):
    out = recipes.drop_and_rescale(deltas, "random", [0.3] * T, name="x", rescale="l1")
    for d, o in zip(deltas, out):
        assert o.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
        assert (o != 0).float().mean() < 0.4


def test_expert_sums_are_added_in_expert_order():
    from merging_helpers.consensus import sum_experts

    x = torch.tensor([[1e8], [1.0], [-1e8]])  # float32: (1e8 + 1) rounds back to 1e8
    assert sum_experts(x).item() == 0.0  # ((1e8 + 1) - 1e8); another order would give 1
    assert weighted_sum(x).item() == 0.0
    assert sum_experts(x[[0, 2, 1]]).item() == 1.0
