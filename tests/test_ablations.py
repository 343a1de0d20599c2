"""Chapter 3 helpers: TIES step by step (hand-worked), merged deltas equal to the engine's
merges bit for bit, λ selection on a fake evaluator."""
import pandas as pd
import pytest
import torch

from merging_helpers.ablations import evaluate_variants, merged_delta, next_lambda, scan_lambdas, sign_conflicts, ties_steps
from merging_helpers.deltas import apply_delta, sign_disagreement, task_vectors
from merging_helpers.drop import magnitude_keep_mask
from merging_helpers.recipes import merge_state_dicts, merge_tensor
from merging_helpers.sweeps import lambda_sweep, pick_lambda

# The chapter's tiny example: 3 experts, 8 entries, density 0.5 (4 kept per expert).
TINY = torch.tensor([
    [0.80, -0.90, 0.10, 0.50, -0.60, 0.20, -0.25, 0.05],
    [0.15, 0.30, -0.10, -0.50, 0.40, -0.55, 0.10, 0.05],
    [0.70, 0.35, 0.05, 0.10, -0.30, 0.20, -0.30, 0.45],
])
# Worked by hand: E1 keeps {0,1,3,4}; E2 keeps {1,3,4,5}; E3 keeps {0,1,7} and one of the
# two entries tied at |Δ| = 0.3 (4 and 6): the lower index, 4.
TINY_SIGNS = ["+", "−", "+", "+", "−", "−", "+", "+"]
TINY_AGREE = ["E1,E3", "E1", "none", "E1", "E1,E3", "E2", "none", "E3"]
TINY_MERGED = [0.75, -0.90, 0.0, 0.50, -0.45, -0.55, 0.0, 0.45]


def test_ties_steps_matches_hand_worked_example():
    table, merged = ties_steps(TINY, density=0.5)
    assert table["elected sign"].tolist() == TINY_SIGNS
    assert table["agree"].tolist() == TINY_AGREE
    torch.testing.assert_close(merged, torch.tensor(TINY_MERGED))
    # the tie at the threshold: E3's entry 4 kept, entry 6 (same |Δ|) dropped
    assert table.loc[4, "trim E3"] == pytest.approx(-0.3) and table.loc[6, "trim E3"] == 0.0
    # every expert keeps exactly round(0.5 · 8) = 4 entries
    assert [(table[f"trim E{t}"] != 0).sum() for t in (1, 2, 3)] == [4, 4, 4]


def test_ties_steps_exact_cancellation_elects_plus():
    table, merged = ties_steps(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]), density=1.0)
    assert table["elected sign"].tolist() == ["+", "+"]
    torch.testing.assert_close(merged, torch.tensor([1.0, 2.0]))


def test_ties_steps_frequency_election_differs_on_entry_1():
    table, merged = ties_steps(TINY, density=0.5, election="frequency")
    assert table.loc[1, "elected sign"] == "+" and table.loc[1, "agree"] == "E2,E3"
    assert merged[1].item() == pytest.approx((0.30 + 0.35) / 2)


def test_ties_steps_equals_merge_tensor():
    for election in ("total", "frequency"):
        _, merged = ties_steps(TINY, density=0.5, election=election)
        engine = merge_tensor("w", torch.zeros(8), list(TINY), "ties", density=0.5, election=election)
        assert torch.equal(merged, engine)


def test_ties_steps_rejects_bad_shapes():
    with pytest.raises(ValueError, match="T × n"):
        ties_steps(torch.zeros(2, 2, 2), density=0.5)
    with pytest.raises(ValueError, match="names"):
        ties_steps(TINY, density=0.5, expert_names=["a", "b"])


# ---- merged_delta: the engine's merge, bit for bit ---------------------------------------


def small_model(seed, base=None, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embeddings.word_embeddings.weight": (40, 8), "encoder.layer.0.attention.self.query.weight": (8, 8),
              "encoder.layer.0.attention.self.query.bias": (8,), "encoder.layer.1.output.dense.weight": (8, 32)}
    if base is None:
        sd = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        sd["embeddings.position_ids"] = torch.arange(6)
        return sd
    return {n: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for n, v in base.items()}


@pytest.fixture(scope="module")
def family():
    base = small_model(0)
    return base, [small_model(s, base) for s in (1, 2, 3)]


@pytest.mark.parametrize("method, kwargs", [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "magnitude_scope": "model"}),
    ("ties", {"density": 0.3, "election": "frequency", "weights": [1.0, 0.5, 0.2], "weighted_election": True}),
    ("dare_ties", {"density": 0.4, "seed": 5}),
    ("magnitude", {"density": 0.5}),
])
@pytest.mark.parametrize("lam", [0.7, 1.3])
def test_merged_delta_scaled_equals_merge_state_dicts(family, method, kwargs, lam):
    base, experts = family
    floating = {n: t for n, t in base.items() if t.is_floating_point()}
    merged = merged_delta(task_vectors(floating, experts), method, **kwargs)
    expected = merge_state_dicts(base, experts, method, lam=lam, progress=False, **kwargs)
    ours = apply_delta(base, merged, lam)
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def test_merged_delta_accepts_a_dict_and_refuses_lam(family):
    base, experts = family
    floating = {n: t for n, t in base.items() if t.is_floating_point()}
    deltas = dict(zip("abc", task_vectors(floating, experts)))
    merged = merged_delta(deltas, "ties", density=0.5)
    assert merged.keys() == floating.keys()
    with pytest.raises(ValueError, match="λ = 1"):
        merged_delta(deltas, "ties", density=0.5, lam=2.0)


# ---- λ selection on a fake evaluator ------------------------------------------------------


class FakeEvaluator:
    """Accuracy of task "a" peaks where the single weight equals 2, task "b" is flat;
    the test split is deliberately different so that it can never drive a choice."""

    def accuracy(self, state_dict, split="test", tasks=None, heads=None):
        w = state_dict["w"].item()
        scores = {"a": max(0.0, 1 - abs(w - 2.0) / 4), "b": 0.5} if split == "validation" else {"a": w / 10, "b": 0.1}
        return {t: scores[t] for t in (tasks or scores)}


def test_scan_lambdas_has_the_sweeps_format():
    base, merged = {"w": torch.tensor(0.0)}, {"w": torch.tensor(1.0)}
    scan = scan_lambdas(FakeEvaluator(), base, merged, [1.0, 2.0, 3.0], label="x")
    assert list(scan.columns) == ["method", "lam", "seed", "split", "task", "accuracy"]
    assert scan.loc[scan["task"] == "a", "accuracy"].tolist() == pytest.approx([0.75, 1.0, 0.75])
    assert set(scan["method"]) == {"x"} and set(scan["split"]) == {"validation"} and scan["seed"].isna().all()
    assert pick_lambda(scan) == 2.0
    with pytest.raises(ValueError):
        scan_lambdas(FakeEvaluator(), base, merged, [])


def test_scan_lambdas_equals_a_lambda_sweep_that_re_merges():
    base = {"w": torch.tensor(0.0)}
    experts = [{"w": torch.tensor(1.0)}, {"w": torch.tensor(3.0)}]
    merged = merged_delta(task_vectors(base, experts), "ties", density=1.0)
    ours = scan_lambdas(FakeEvaluator(), base, merged, [0.5, 1.0], label="ties")
    theirs = lambda_sweep(FakeEvaluator(), base, experts, [0.5, 1.0], split="validation", method="ties",
                          density=1.0, progress=False)
    pd.testing.assert_frame_equal(ours, theirs)


def test_evaluate_variants_chooses_on_validation_and_flags_grid_edges():
    base = {"w": torch.tensor(0.0)}
    deltas = [{"w": torch.tensor(1.0)}, {"w": torch.tensor(3.0)}]  # TA sum = 4, TIES mean = 2
    report, scans = evaluate_variants(FakeEvaluator(), base, deltas, {
        "ta": ("task_arithmetic", {}, [0.25, 0.5, 1.0]),
        "ties": ("ties", {"density": 1.0}, [0.5, 1.0]),
    }, progress=False, widen=False)
    chosen = report.groupby("method")["lam"].first()
    assert chosen["ta"] == 0.5 and chosen["ties"] == 1.0
    edge = report.groupby("method")["at_edge"].first()
    assert not edge["ta"] and edge["ties"]
    assert set(report["split"]) == {"test"} and set(scans["split"]) == {"validation"}
    # test scores at the chosen λ (w = 2): a = 0.2, b = 0.1
    assert report.loc[report["task"] == "a", "accuracy"].tolist() == pytest.approx([0.2, 0.2])
    assert len(scans) == (3 + 2) * 2


def test_evaluate_variants_widens_along_the_ladder_until_the_best_is_inside():
    base = {"w": torch.tensor(0.0)}
    deltas = [{"w": torch.tensor(1.0)}, {"w": torch.tensor(3.0)}]  # TA sum = 4: the best λ is 0.5 (w = 2)
    report, scans = evaluate_variants(FakeEvaluator(), base, deltas, {"ta": ("task_arithmetic", {}, [0.2, 0.3])},
                                      progress=False)
    assert report["lam"].iloc[0] == 0.5 and not report["at_edge"].iloc[0]
    assert sorted(scans["lam"].unique().tolist()) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    # capped: the scan stops after max_lambdas values and says the choice is on its edge
    report, scans = evaluate_variants(FakeEvaluator(), base, deltas, {"ta": ("task_arithmetic", {}, [0.1, 0.2])},
                                      progress=False, max_lambdas=3)
    assert report["lam"].iloc[0] == 0.3 and report["at_edge"].iloc[0] and scans["lam"].nunique() == 3
    # never below the first rung: a best λ at 0.1 stays flagged
    assert next_lambda([0.1, 0.2], 0.1) is None and next_lambda([0.2, 0.3], 0.2) == 0.1
    assert next_lambda([0.7, 0.8, 0.9], 0.8) is None and next_lambda([0.7, 0.8, 0.9], 0.9) == 1.0


def test_evaluate_variants_runs_random_recipes_once_per_seed():
    base = {"w": torch.zeros(50)}
    deltas = [{"w": torch.linspace(0.1, 1, 50)}, {"w": torch.linspace(0.2, 2, 50)}]

    class MeanEvaluator:
        def accuracy(self, state_dict, split="test", tasks=None, heads=None):
            return {"a": float(state_dict["w"].mean()) / 10}

    report, scans = evaluate_variants(MeanEvaluator(), base, deltas, {"dt": ("dare_ties", {"density": 0.5}, [1.0, 2.0])},
                                      seeds=(0, 1, 2), progress=False, widen=False)
    assert report["seed"].tolist() == [0, 1, 2] and len(scans) == 6
    assert report["accuracy"].nunique() == 3  # three different masks
    assert set(report["lam"]) == {2.0}  # larger λ, larger mean: chosen over all seeds


# ---- sign conflicts -----------------------------------------------------------------------


def test_sign_conflicts_by_hand():
    deltas = [{"w": torch.tensor([1.0, 1.0, 0.0, 2.0])}, {"w": torch.tensor([-1.0, 1.0, 3.0, 0.0])},
              {"w": torch.tensor([0.0, 0.0, -3.0, 0.0])}]
    # contested (≥ 2 nonzero): entries 0, 1, 2; conflicting: 0 and 2
    assert sign_conflicts(deltas) == pytest.approx(2 / 3)
    # trimmed to one entry each (ties → lowest index): [.,.,.,2], [.,.,3,.], [.,.,-3,.] → only entry 2, conflicting
    assert sign_conflicts(deltas, density=0.25) == pytest.approx(1.0)
    assert sign_conflicts([{"w": torch.ones(3)}, {"w": torch.ones(3)}]) == 0.0


def test_sign_conflicts_dense_equals_chapter_1(family):
    base, experts = family
    floating = {n: t for n, t in base.items() if t.is_floating_point()}
    deltas = task_vectors(floating, experts)
    assert sign_conflicts(deltas) == pytest.approx(sign_disagreement(deltas))
    trimmed = [{n: d[n] * magnitude_keep_mask(d[n], 0.3) for n in d} for d in deltas]
    assert sign_conflicts(deltas, density=0.3) == pytest.approx(sign_disagreement(trimmed))
