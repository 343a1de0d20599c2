"""Chapter 2's sweep loops (merging_helpers.sweeps) on tiny state dicts and a fake evaluator."""
import math

import pandas as pd
import pytest
import torch

from conftest import bert_like, expert_of
from merging_helpers import sweeps
from merging_helpers.recipes import merge_state_dicts

W = "encoder.layer.0.output.dense.weight"
B = "encoder.layer.0.output.dense.bias"
TASKS = ("a", "b")


def make_models(n_experts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {W: torch.randn(8, 16, generator=g) + 3.0, B: torch.randn(8, generator=g) + 3.0,
            "embeddings.position_ids": torch.arange(8)}
    experts = []
    for _ in range(n_experts):
        experts.append({name: t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone()
                        for name, t in base.items()})
    return base, experts


class FakeEvaluator:
    """Scores a state dict by the mean of W (task "a") and of B (task "b"); records every call."""

    def __init__(self):
        self.calls = []

    def accuracy(self, state_dict, split="test", tasks=None):
        self.calls.append(({k: v.clone() for k, v in state_dict.items()}, split, tasks))
        scores = {"a": state_dict[W].mean().item(), "b": state_dict[B].mean().item()}
        return {t: scores[t] for t in (tasks or TASKS)}


class FakeZoo:
    def __init__(self, base, experts):
        self.base = base
        self.experts = dict(zip(TASKS, experts))
        self.task_names = list(TASKS)


def test_lambda_zero_gives_the_base_and_one_gives_the_sum():
    base, experts = make_models()
    ev = FakeEvaluator()
    frame = sweeps.lambda_sweep(ev, base, experts, [0.0, 0.5, 1.0], split="validation", progress=False)
    sd0 = ev.calls[0][0]
    for name in base:
        torch.testing.assert_close(sd0[name], base[name])
    sd1 = ev.calls[2][0]
    torch.testing.assert_close(sd1[W], base[W] + (experts[0][W] - base[W]) + (experts[1][W] - base[W]))
    assert (frame["split"] == "validation").all() and all(c[1] == "validation" for c in ev.calls)
    # hand-checked: accuracy of task "a" at λ is mean(W_b) + λ·mean(ΣΔ)
    slope = sum((e[W] - base[W]).mean().item() for e in experts)
    got = frame[frame.task == "a"].set_index("lam")["accuracy"]
    assert got[0.5] == pytest.approx(base[W].mean().item() + 0.5 * slope, abs=1e-5)


def test_lambda_sweep_frame_shape_and_columns():
    base, experts = make_models(3)
    frame = sweeps.lambda_sweep(FakeEvaluator(), base, experts, [0.1, 0.2, 0.3, 0.4], progress=False)
    assert list(frame.columns) == ["method", "lam", "seed", "split", "task", "accuracy"]
    assert len(frame) == 4 * len(TASKS)
    assert frame["seed"].isna().all()  # task arithmetic is deterministic: merged once per λ
    assert sorted(frame["lam"].unique()) == [0.1, 0.2, 0.3, 0.4]


def test_pick_lambda_best_mean_and_ties_to_smallest():
    frame = pd.DataFrame({"lam": [0.1, 0.1, 0.3, 0.3, 0.5, 0.5],
                          "task": ["a", "b"] * 3,
                          "accuracy": [0.5, 0.9, 0.8, 0.6, 0.9, 0.4]})
    # means: 0.7, 0.7, 0.65 → tie between 0.1 and 0.3 → 0.1
    assert sweeps.pick_lambda(frame) == 0.1
    frame.loc[2, "accuracy"] = 0.81
    assert sweeps.pick_lambda(frame) == 0.3
    with pytest.raises(ValueError, match="empty"):
        sweeps.pick_lambda(frame.iloc[:0])


def test_seeds_change_dare_but_not_magnitude():
    base, experts = make_models()
    dare = [sweeps.pruned_expert(base, experts[0], "dare_linear", 0.5, seed=s)[W] for s in (0, 1)]
    mag = [sweeps.pruned_expert(base, experts[0], "magnitude", 0.5, seed=s)[W] for s in (0, 1)]
    assert not torch.equal(dare[0], dare[1])
    torch.testing.assert_close(mag[0], mag[1])
    # the same seed gives the same DARE mask
    torch.testing.assert_close(sweeps.pruned_expert(base, experts[0], "dare_linear", 0.5, seed=0)[W], dare[0])


def test_pruned_expert_magnitude_keeps_top_k_and_dare_rescales():
    base, experts = make_models()
    delta = experts[0][W] - base[W]
    p = 0.75
    mag = sweeps.pruned_expert(base, experts[0], "magnitude", p)[W] - base[W]
    kept = mag != 0
    assert int(kept.sum()) == round((1 - p) * delta.numel())
    assert delta.abs()[kept].min() >= delta.abs()[~kept].max()
    dare = sweeps.pruned_expert(base, experts[0], "dare_linear", p, seed=3)[W] - base[W]
    kept = dare != 0
    torch.testing.assert_close(dare[kept], delta[kept] / (1 - p), rtol=1e-4, atol=1e-5)


def test_pruning_curve_rows():
    base, experts = make_models()
    zoo, ev = FakeZoo(base, experts), FakeEvaluator()
    rates = [0.1, 0.5, 0.9]
    dare = sweeps.pruning_curve(ev, zoo, "a", "dare_linear", rates, seeds=(0, 1, 2), progress=False)
    assert len(dare) == 3 * 3 and set(dare["task"]) == {"a"} and list(dare["seed"].unique()) == [0, 1, 2]
    assert all(call[2] == ["a"] for call in ev.calls)  # only the expert's own task is scored
    mag = sweeps.pruning_curve(ev, zoo, "b", "magnitude", rates, seeds=(0, 1, 2), progress=False)
    assert len(mag) == 3 and mag["seed"].isna().all()
    both = sweeps.pruning_curves(FakeEvaluator(), zoo, ["magnitude", "dare_linear"], rates, seeds=(0, 1),
                                 progress=False)
    assert len(both) == len(TASKS) * (3 + 3 * 2)
    labelled = sweeps.pruning_curves(FakeEvaluator(), zoo, {"DARE (L1)": ("dare_linear", {"rescale": "l1"})},
                                     [0.5], seeds=(0,), progress=False)
    assert set(labelled["method"]) == {"DARE (L1)"}


def test_merge_grid_overrides_and_rejects_empty():
    base, experts = make_models()
    frame = sweeps.merge_grid(FakeEvaluator(), base, experts, "dare_linear", [{"drop_rate": 0.5}, {"drop_rate": 0.9}],
                              seeds=(0, 1), lam=0.3, progress=False)
    assert len(frame) == 2 * 2 * len(TASKS)
    assert set(frame["method"]) == {"dare_linear"}
    with pytest.raises(ValueError, match="at least one setting"):
        sweeps.merge_grid(FakeEvaluator(), base, experts, "magnitude", [], progress=False)
    with pytest.raises(ValueError, match="at least one seed"):
        sweeps.merge_grid(FakeEvaluator(), base, experts, "dare_linear", [{"drop_rate": 0.5}], seeds=(),
                          progress=False)


def test_dare_layer_outputs_unbiased_and_unrescaled_shrinks():
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)
    full = x @ delta.T
    torch.testing.assert_close(sweeps.dare_layer_outputs(x, delta, 0.0, n_masks=2)[1], full)
    p = 0.5
    rescaled = sweeps.dare_layer_outputs(x, delta, p, n_masks=4000, seed=1)
    plain = sweeps.dare_layer_outputs(x, delta, p, n_masks=4000, seed=1, rescale=False)
    torch.testing.assert_close(rescaled, plain / (1 - p))  # the same masks
    # standard error of the mean over 4000 masks is ~ sqrt(p/(1-p) Σ Δ²x²)/63 ≈ 0.1 here
    assert (rescaled.mean(0) - full).abs().max() < 0.5
    assert (plain.mean(0) - (1 - p) * full).abs().max() < 0.25
    with pytest.raises(ValueError, match="drop_rate"):
        sweeps.dare_layer_outputs(x, delta, 1.0)


def test_rescale_factors_match_the_recipe_masks():
    base, experts = make_models()
    p = 0.6
    factors = sweeps.rescale_factors(base, experts[0], p, seed=4).set_index("name")
    assert set(factors.index) == {W, B}  # the integer buffer is skipped
    assert factors["inverse"].eq(1 / (1 - p)).all()
    l1 = sweeps.pruned_expert(base, experts[0], "dare_linear", p, seed=4, rescale="l1")
    none = sweeps.pruned_expert(base, experts[0], "dare_linear", p, seed=4, rescale=None)
    for name in (W, B):
        kept = (none[name] - base[name]) != 0
        ratio = ((l1[name] - base[name])[kept] / (none[name] - base[name])[kept])
        torch.testing.assert_close(ratio, torch.full_like(ratio, factors.loc[name, "l1"]), rtol=1e-3, atol=1e-3)
        assert factors.loc[name, "kept_fraction"] == pytest.approx(kept.float().mean().item())
    assert factors["ratio"].sub(factors["l1"] / factors["inverse"]).abs().max() < 1e-12


def test_rescale_factors_hand_worked():
    # p = 0 keeps everything: the L1 factor is 1, the inverse factor 1, ratio 1
    base, experts = make_models()
    f = sweeps.rescale_factors(base, experts[0], 0.0)
    assert f["l1"].tolist() == pytest.approx([1.0, 1.0]) and f["ratio"].tolist() == pytest.approx([1.0, 1.0])
    assert not math.isnan(f["l1"].sum())


def test_seed_summary_hand_worked():
    frame = pd.DataFrame({"method": ["x"] * 4 + ["y"] * 2,
                          "seed": pd.array([0, 0, 1, 1, None, None], dtype="Int64"),
                          "task": ["a", "b"] * 3,
                          "accuracy": [0.5, 0.7, 0.7, 0.9, 0.4, 0.6]})
    s = sweeps.seed_summary(frame, "method").set_index(["method", "task"])
    assert s.loc[("x", "a"), "mean"] == pytest.approx(60.0)
    assert s.loc[("x", "a"), "std"] == pytest.approx(math.sqrt(200.0))  # sample std of 50, 70
    assert s.loc[("x", "mean"), "mean"] == pytest.approx(70.0)  # per-seed means 60 and 80
    assert s.loc[("x", "mean"), "std"] == pytest.approx(math.sqrt(200.0))
    assert s.loc[("y", "mean"), "mean"] == pytest.approx(50.0) and math.isnan(s.loc[("y", "a"), "std"])
    table = sweeps.mean_std_table(sweeps.seed_summary(frame, "method"), "method")
    assert list(table.columns) == ["a", "b", "mean"]
    assert table.loc["x", "mean"] == "70.0 ± 14.1" and table.loc["y", "b"] == "60.0"


def test_lambda_sweep_merges_once_and_equals_merging_per_lambda():
    # a recording evaluator keeps every state dict it is asked to score
    base = bert_like(dtype=torch.bfloat16)
    experts = [expert_of(base, s) for s in (1, 2, 3)]
    seen = []

    class Recorder:
        def accuracy(self, state_dict, split="test", tasks=None):
            seen.append({n: t.clone() for n, t in state_dict.items()})
            return {"t": float(sum(float(t.double().sum()) for t in state_dict.values() if t.is_floating_point()))}

    for method, kw in [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_linear", {"drop_rate": 0.5})]:
        seen.clear()
        sweeps.lambda_sweep(Recorder(), base, experts, [0.3, 1.0], method=method, seeds=[4], progress=False, **kw)
        for lam, got in zip([0.3, 1.0], seen):
            want = merge_state_dicts(base, experts, method, lam=lam, progress=False,
                                     **kw, **({"seed": 4} if method == "dare_linear" else {}))
            assert all(torch.equal(got[n], want[n]) for n in want), (method, lam)
    with pytest.raises(ValueError, match="lambdas"):
        sweeps.lambda_sweep(Recorder(), base, experts, [0.3], lam=0.5)
