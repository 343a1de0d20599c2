"""Chapter 8's protocol on a fake evaluator whose accuracy is a known function of the merge."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import bert_like, expert_of

from merging_helpers import compare
from merging_helpers.compare import CONTENDERS, Contender, outcome_table, run_comparison, tune_and_test
from merging_helpers.deltas import task_vectors

TASKS = ("a", "b")


class FakeEvaluator:
    """Accuracy peaks where the merged model's first tensor moved by `best` from the base; the test
    split is the validation split shifted, so a λ chosen on test would differ."""

    def __init__(self, base, best=1.0, n=40):
        self.base, self.best, self.n = base, best, n
        self.name = next(n for n, t in base.items() if t.is_floating_point())
        self.calls = []
        self.zoo = SimpleNamespace(root="fake", tasks={t: SimpleNamespace(splits={"validation": [0] * n, "test": [0] * n})
                                                       for t in TASKS})

    def _score(self, sd, split):
        moved = float((sd[self.name] - self.base[self.name]).norm() / self.scale)
        target = self.best if split == "validation" else self.best + 0.6
        return max(0.0, 1.0 - abs(moved - target))

    def accuracy(self, sd, split="test", tasks=None):
        self.calls.append(split)
        return {t: self._score(sd, split) for t in TASKS}

    def correct(self, sd, split="test", tasks=None):
        self.calls.append(split)
        k = round(self._score(sd, split) * self.n)
        return {t: torch.arange(self.n) < k for t in TASKS}


@pytest.fixture
def family():
    base = bert_like()
    deltas = task_vectors(base, [expert_of(base, s) for s in (1, 2, 3)])
    return base, deltas


def test_lambda_is_chosen_on_validation_and_only_it_is_tested(family):
    base, deltas = family
    ev = FakeEvaluator(base, best=1.0)
    ta = sum(d[ev.name] for d in deltas)
    ev.scale = float(ta.norm())  # λ = 1 is the validation optimum; test would prefer 1.6
    out = tune_and_test(ev, base, deltas, CONTENDERS["Task Arithmetic"], None, lambdas=(0.4, 1.0, 1.6))
    assert out.lam == 1.0 and out.validation[1.0] == pytest.approx(100)
    assert ev.calls == ["validation"] * 3 + ["test"]
    assert out.evaluations == 4 and out.test_per_seed == [pytest.approx(100 * 0.4, abs=2.5)]


def test_a_random_method_is_merged_per_seed_and_scored_by_shares(family):
    base, deltas = family
    ev = FakeEvaluator(base)
    ev.scale = float(sum(d[ev.name] for d in deltas).norm())
    out = tune_and_test(ev, base, deltas, CONTENDERS["DARE"], 0.5, lambdas=(1.0,), seeds=(0, 1, 2))
    assert len(out.test_per_seed) == 3 and out.evaluations == 4  # one λ scanned on seed 0, 3 tests
    assert ev.calls == ["validation", "test", "test", "test"]
    assert all(0 <= v <= 1 for v in out.shares["a"])
    assert np.mean(out.shares["a"]) * 100 == pytest.approx(out.test, abs=1e-4)


def test_bad_budgets_are_refused_before_any_merge(family):
    base, deltas = family
    ev = FakeEvaluator(base)
    with pytest.raises(ValueError, match=r"kept fraction, in \(0, 1\], got 1.5"):
        tune_and_test(ev, base, deltas, CONTENDERS["TIES"], 1.5)
    with pytest.raises(ValueError, match="TIES prunes: give a budget"):
        tune_and_test(ev, base, deltas, CONTENDERS["TIES"], None)
    assert ev.calls == []


def _kept(merged_or_list):
    total = sum(t.numel() for t in merged_or_list.values())
    return sum(int((t != 0).sum()) for t in merged_or_list.values()) / total


@pytest.mark.parametrize("name", ["magnitude", "DARE", "DP (DPPA's pruning)", "RMS-adaptive"])
def test_each_pruning_contender_keeps_about_its_budget(family, name):
    base, deltas = family
    one = [deltas[0]]  # one expert: the merged delta's non-zeros are exactly its kept entries
    merged = CONTENDERS[name].merge(one, 0.2, 0)
    assert _kept(merged) == pytest.approx(0.2, abs=0.03), name


def test_dense_and_full_budget_merges_are_task_arithmetic(family):
    base, deltas = family
    ta = CONTENDERS["Task Arithmetic"].merge(deltas, None, 0)
    for name in ("magnitude", "DARE"):  # (DP varies its rates around α = 0 by design)
        merged = CONTENDERS[name].merge(deltas, 1.0, 0)
        for n in ta:
            torch.testing.assert_close(merged[n], ta[n], msg=f"{name} at budget 1, {n}")


def test_outcomes_are_cached_and_a_changed_setting_misses(family, tmp_path):
    base, deltas = family
    ev = FakeEvaluator(base)
    ev.scale = float(sum(d[ev.name] for d in deltas).norm())
    calls = []
    counted = Contender("counted", "x", lambda d, b, s: calls.append(s) or CONTENDERS["DARE"].merge(d, b, s), random=True)
    first = run_comparison(ev, base, deltas, [counted], budgets=(0.5,), lambdas=(1.0,), seeds=(0, 1),
                           progress=False, cache=tmp_path)
    again = run_comparison(ev, base, deltas, [counted], budgets=(0.5,), lambdas=(1.0,), seeds=(0, 1),
                           progress=False, cache=tmp_path)
    assert calls == [0, 1]
    assert again[0].test_per_seed == first[0].test_per_seed and again[0].lam == first[0].lam
    np.testing.assert_array_equal(again[0].shares["a"], first[0].shares["a"])
    run_comparison(ev, base, deltas, [counted], budgets=(0.5,), lambdas=(1.0, 1.3), seeds=(0, 1),
                   progress=False, cache=tmp_path)
    assert calls == [0, 1, 0, 1]


def test_the_table_pairs_every_row_with_the_reference(family):
    base, deltas = family
    ev = FakeEvaluator(base)
    ev.scale = float(sum(d[ev.name] for d in deltas).norm())
    outs = run_comparison(ev, base, deltas, [CONTENDERS["Task Arithmetic"], CONTENDERS["TIES"]], budgets=(0.2,),
                          lambdas=(0.7, 1.0), progress=False)
    table = outcome_table(outs).set_index("method")
    assert table.loc["Task Arithmetic", "− Task Arithmetic (points)"] == 0
    assert table.loc["TIES", "− Task Arithmetic (points)"] == pytest.approx(
        table.loc["TIES", "test accuracy (%)"] - table.loc["Task Arithmetic", "test accuracy (%)"])
    assert table.loc["TIES", "kept"] == 0.2 and table.loc["Task Arithmetic", "kept"] == 1.0
    assert compare.LAMBDAS == tuple(sorted(compare.LAMBDAS))


def test_the_apl_contender_keeps_about_its_budget_and_needs_its_importances(family):
    from merging_helpers import apl
    base, deltas = family
    experts = {"x": {n: base[n] + deltas[0][n] if n in deltas[0] else base[n] for n in base}}
    contender = compare.apl_gradient(None, base, experts, {"x": [("text", 0)] * 5})
    parts = apl.groups(experts["x"], "layer")
    values = torch.linspace(-1.0, 0.0, len(parts))  # some partitions matter more than others
    contender.state["importances"] = {"x": apl.Importance("x", "layer", list(parts), values, 1.0, 1.0)}
    merged = contender.merge([deltas[0]], 0.2, 0)
    floating = {n: t for n, t in merged.items() if t.is_floating_point()}
    assert _kept(floating) == pytest.approx(0.2, abs=0.05)
    assert "ε = (1 − p)/2" in contender.knobs
