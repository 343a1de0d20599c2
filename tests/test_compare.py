"""Chapter 8's protocol on a fake evaluator whose accuracy is a known function of the merge."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import bert_like, expert_of

from merging_helpers import compare
from merging_helpers.compare import CONTENDERS, Contender, outcome_table, run_comparison, tune_and_test
from merging_helpers.deltas import task_vectors

TASKS = ("a", "b")
compare_tests = sys.modules[__name__]


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


@pytest.mark.parametrize("best, cap, chosen, scored", [(0.1, 12, 0.1, 4),  # below the grid: one step down, then λ ≤ 0 stops
                                                       (1.9, 12, 1.9, 7),  # above it: up to 1.9; 2.2 shows it is a peak
                                                       (1.9, 5, 1.6, 5)])  # the scan stops at MAX_LAMBDAS
def test_a_best_lambda_on_the_grid_edge_widens_the_scan_on_validation(family, monkeypatch, best, cap, chosen, scored):
    base, deltas = family
    monkeypatch.setattr(compare, "MAX_LAMBDAS", cap)
    ev = FakeEvaluator(base, best=best)
    ev.scale = float(sum(d[ev.name] for d in deltas).norm())
    out = tune_and_test(ev, base, deltas, CONTENDERS["Task Arithmetic"], None, lambdas=(0.4, 0.7, 1.0))
    assert out.lam == pytest.approx(chosen) and len(out.validation) == scored
    assert ev.calls == ["validation"] * scored + ["test"] and out.evaluations == scored + 1
    assert scored <= compare.MAX_LAMBDAS


def _kept_per_matrix(merged):
    return [float((t != 0).float().mean()) for n, t in merged.items() if t.dim() == 2 and "layer" in n]


def test_the_rms_contender_reads_lambda_in_units_of_sigma():
    base = bert_like(hidden=64)
    deltas = task_vectors(base, [expert_of(base, s) for s in (1, 2)])
    flat = _kept_per_matrix(compare.rms_contender(0.0).merge(deltas, 0.2, 0))
    spread = _kept_per_matrix(compare.rms_contender(0.4).merge(deltas, 0.2, 0))
    assert np.ptp(flat) < 0.05 and np.ptp(spread) > 0.15  # λ = 0.4/σ moves rates by tenths; λ = 0 by mask noise
    assert CONTENDERS["RMS-adaptive"].knobs == f"λ = {compare.RMS_DROP_SCALE:g}/σ, aware"
    with pytest.raises(ValueError, match="drop_scale"):
        compare.rms_contender(-0.1)


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


def _apl_with_importances(contender, experts, weights=None):
    from merging_helpers import apl
    parts = apl.groups(experts["x"], "layer")
    values = torch.linspace(-1.0, 0.0, len(parts))  # some partitions matter more than others
    contender.state["importances"] = {"x": apl.Importance("x", "layer", list(parts), values, 1.0, 1.0)}
    contender.state["weights"] = weights
    return contender


def test_the_apl_contender_keeps_about_its_budget_and_needs_its_importances(family):
    base, deltas = family
    experts = {"x": {n: base[n] + deltas[0][n] if n in deltas[0] else base[n] for n in base}}
    contender = _apl_with_importances(compare.apl_contender(None, base, experts, {"x": [("text", 0)] * 5}), experts)
    merged = contender.merge([deltas[0]], 0.2, 0)
    floating = {n: t for n, t in merged.items() if t.is_floating_point()}
    assert _kept(floating) == pytest.approx(0.2, abs=0.05)
    assert "ε = (1 − p)/2" in contender.knobs and contender.name == "APL (gradient, TA)"


def test_mi_task_arithmetic_scales_each_expert_by_its_weight(family):
    base, deltas = family
    experts = {"x": {n: base[n] + deltas[0][n] if n in deltas[0] else base[n] for n in base}}
    shots = {"x": [("text", 0)] * 5}
    ta = _apl_with_importances(compare.apl_contender(None, base, experts, shots), experts)
    mi = _apl_with_importances(compare.apl_contender(None, base, experts, shots, "causal", "MI-TA"), experts,
                               torch.tensor([0.5], dtype=torch.float64))
    assert mi.name == "APL (causal, MI-TA)" and mi.chapter == "04_apl"
    plain, weighted = ta.merge([deltas[0]], 0.3, 7), mi.merge([deltas[0]], 0.3, 7)  # same masks
    for n in plain:
        torch.testing.assert_close(weighted[n], 0.5 * plain[n], msg=n)
    with pytest.raises(ValueError, match="weighting must be one of"):
        compare.apl_contender(None, base, experts, shots, weighting="MI")
    with pytest.raises(ValueError, match="importance must be one of"):
        compare.apl_contender(None, base, experts, shots, importance="fisher")


def test_weight_averaging_is_the_mean_of_the_experts_and_is_not_tuned(family):
    base, deltas = family
    experts = [{n: base[n] + d[n] for n in d} for d in deltas]
    ev = FakeEvaluator(base)
    ev.scale = 1.0
    avg = CONTENDERS["weight averaging"]
    out = tune_and_test(ev, base, deltas, avg, None, lambdas=(0.4, 1.0, 1.6))
    assert out.lam == 1.0 and list(out.validation) == [1.0] and ev.calls == ["validation", "test"]
    merged = avg.merge(deltas, None, 0)
    for n in merged:  # θ_b + merged = (θ_1 + θ_2 + θ_3) / 3
        torch.testing.assert_close(base[n] + merged[n], sum(e[n] for e in experts) / 3, msg=n)


def test_the_experts_row_scores_each_task_with_its_own_expert():
    seen = []

    class OwnTask:
        def correct(self, params, split="test", tasks=None):
            seen.append((params["id"], tuple(tasks), split))
            return {t: torch.tensor([True, params["id"] == t, False, True]) for t in tasks}

    out = compare.experts_outcome(OwnTask(), {"a": {"id": "a"}, "b": {"id": "b"}}, ["a", "b"])
    assert seen == [("a", ("a",), "test"), ("b", ("b",), "test")]
    assert out.test == pytest.approx(75.0) and out.budget is None
    np.testing.assert_array_equal(out.shares["b"], [1.0, 1.0, 0.0, 1.0])


def test_average_ranks_on_a_hand_worked_case():
    import pandas as pd
    scores = pd.DataFrame({"x": [90, 80, 70], "y": [85, 80, 75], "z": [60, 70, 80], "partial": [99, None, 99]})
    # block 1: x 1, y 2, z 3; block 2: x and y tie for 1–2 → 1.5 each, z 3; block 3: z 1, y 2, x 3
    ranks = compare.average_ranks(scores)
    assert ranks.to_dict() == pytest.approx({"x": (1 + 1.5 + 3) / 3, "y": (2 + 1.5 + 2) / 3, "z": (3 + 3 + 1) / 3})
    assert "partial" not in ranks  # not scored in every block
    with pytest.raises(ValueError, match="need 2 or more methods"):
        compare.average_ranks(scores[["x", "partial"]])


def test_critical_difference_matches_demsar():
    # Demšar (2006), Table 5(a): q_0.05 for k = 2..10, and his worked example CD = 1.25 (k = 4, N = 14)
    q_table = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), q_table):
        assert compare.critical_difference(k, 6) == pytest.approx(q * np.sqrt(k * (k + 1) / 36), abs=2e-3), k
    assert compare.critical_difference(4, 14) == pytest.approx(1.25, abs=5e-3)
    with pytest.raises(ValueError, match="alpha in"):
        compare.critical_difference(4, 14, alpha=1.5)


def test_every_setting_names_known_tasks_of_its_tier():
    from merging_helpers import zoo
    assert compare.SETTINGS[0].tasks is None and compare.SETTINGS[0].tier == "light"
    for s in compare.SETTINGS:
        assert s.tier in zoo.TIERS
        assert set(s.tasks or ()) <= set(zoo.TIER_TASKS.get(s.tier, zoo.TASK_NAMES)), s


def test_a_cached_outcome_gives_the_same_interval_as_a_fresh_one(family, tmp_path, monkeypatch):
    # tasks out of alphabetical order, each with its own right/wrong pattern: the bootstrap draws
    # per task in order, so a cache that reordered the tasks would move the interval
    monkeypatch.setattr(compare_tests, "TASKS", ("news", "compare"))
    base, deltas = family
    ev = FakeEvaluator(base, n=400)
    ev.scale = float(sum(d[ev.name] for d in deltas).norm())
    plain = ev.correct
    odd = torch.arange(400) % 3 == 0
    ev.correct = lambda sd, split="test", tasks=None: {t: v if t == "news" else v.flip(0) & odd
                                                       for t, v in plain(sd, split, tasks).items()}
    contenders = [CONTENDERS["Task Arithmetic"], CONTENDERS["DARE"]]
    args = dict(budgets=(0.5,), lambdas=(1.0,), seeds=(0, 1), progress=False, cache=tmp_path)
    fresh = outcome_table(run_comparison(ev, base, deltas, contenders, **args))
    cached = outcome_table(run_comparison(ev, base, deltas, contenders, **args))
    assert fresh[["95% CI low", "95% CI high"]].equals(cached[["95% CI low", "95% CI high"]])


def test_apl_contenders_share_one_gradient_per_expert_and_each_trace_once(family, monkeypatch):
    from merging_helpers import apl, taylor
    base, deltas = family
    experts = {t: {n: base[n] + d[n] if n in d else base[n] for n in base} for t, d in zip(("x", "y"), deltas)}
    shots = {t: [("text", 0)] * 5 for t in experts}
    calls = []

    def importance(t, level, units):
        parts = apl.groups(experts[t], level)
        values = -torch.arange(1.0, len(parts) + 1, dtype=torch.float64) * (2.0 if t == "y" else 1.0)
        return apl.Importance(t, level, list(parts), values, 1.0, 1.0, units)

    def fake_gradient(scorer, base, expert, t, examples, levels):
        calls.append(("gradient", t, tuple(levels)))
        return {level: importance(t, level, "loss") for level in levels}

    def fake_trace(scorer, base, expert, t, examples, level):
        calls.append(("causal", t, level))
        return importance(t, level, "probability")

    monkeypatch.setattr(taylor, "gradient_importances", fake_gradient)
    monkeypatch.setattr(apl, "trace", fake_trace)
    variants = (("causal", "TA", "layer"), ("gradient", "TA", "layer"), ("gradient", "TA", "hidden"),
                ("gradient", "MI-TA", "layer"))
    together = compare.apl_contenders(None, base, experts, shots, variants)
    for contender in together:
        assert contender.prepare() >= 0.0  # its cost, reported
    assert sorted(calls) == [("causal", "x", "layer"), ("causal", "y", "layer"),
                             ("gradient", "x", ("layer", "hidden", "model")), ("gradient", "y", ("layer", "hidden", "model"))]
    calls.clear()
    alone = [compare.apl_contender(None, base, experts, shots, *v) for v in variants]
    for contender in alone:
        contender.prepare()
    assert len(calls) == 2 * len(variants)  # each computes its own, as before
    for a, b in zip(together, alone):
        assert a.state["importances"].keys() == b.state["importances"].keys()
        for t in experts:
            assert torch.equal(a.state["importances"][t].values, b.state["importances"][t].values)
        assert (a.state["weights"] is None) == (b.state["weights"] is None)
        if a.state["weights"] is not None:
            assert torch.equal(torch.as_tensor(a.state["weights"]), torch.as_tensor(b.state["weights"]))
        merged_a, merged_b = a.merge(deltas[:2], 0.3, 1), b.merge(deltas[:2], 0.3, 1)
        assert all(torch.equal(merged_a[n], merged_b[n]) for n in merged_a)


def test_apl_contenders_read_a_store_the_chapter_has_used(family, monkeypatch):
    """Importances read before the contenders exist (8b's plots) are not computed again, and an
    expert not read yet gets every level the contenders need in one backward pass."""
    from merging_helpers import apl, taylor
    base, deltas = family
    experts = {t: {n: base[n] + d[n] if n in d else base[n] for n in base} for t, d in zip(("x", "y"), deltas)}
    shots = {t: [("text", 0)] * 5 for t in experts}
    calls = []

    def importance(t, level):
        parts = apl.groups(experts[t], level)
        return apl.Importance(t, level, list(parts), -torch.arange(1.0, len(parts) + 1, dtype=torch.float64), 1.0, 1.0)

    def fake_gradient(scorer, base, expert, t, examples, levels):
        calls.append(("gradient", t, tuple(levels)))
        return {level: importance(t, level) for level in levels}

    def fake_trace(scorer, base, expert, t, examples, level):
        calls.append(("causal", t, level))
        return importance(t, level)

    monkeypatch.setattr(taylor, "gradient_importances", fake_gradient)
    monkeypatch.setattr(apl, "trace", fake_trace)
    store = compare.Importances(None, base, experts, shots)
    store.of("causal", "x", ("layer",))
    store.of("gradient", "x", ("layer",))
    variants = (("causal", "TA", "layer"), ("gradient", "TA", "hidden"))
    for contender in compare.apl_contenders(None, base, experts, shots, variants, shared=store):
        contender.prepare()
    assert calls == [("causal", "x", "layer"), ("gradient", "x", ("layer",)), ("causal", "y", "layer"),
                     ("gradient", "x", ("layer", "hidden")), ("gradient", "y", ("layer", "hidden"))]
    with pytest.raises(ValueError, match="another scorer, base, experts"):
        compare.apl_contenders(None, base, dict(experts), shots, variants, shared=store)
