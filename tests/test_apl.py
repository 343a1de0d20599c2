"""APL (chapter 4): partitions, tracing (Eq. 5), calibration (Eq. 11), weights (Eq. 12), merging."""
import math

import pytest
import torch

from merging_helpers import apl
from merging_helpers import zoo as zoo_lib
from merging_helpers.config import MergeConfig
from merging_helpers.evaluation import Evaluator
from merging_helpers.partitions import PerRow, broadcast_rate
from merging_helpers.recipes import merge_state_dicts
from merging_helpers.tasks import few_shot

DEVICE = zoo_lib.default_device()


@pytest.fixture(scope="module")
def scorer():
    return Evaluator(zoo_lib.load_zoo(device=DEVICE), device=DEVICE)


# ---- partitions --------------------------------------------------------------------------------

def _coverage(shapes, level):
    """How many groups cover each entry, per tensor."""
    counts = {n: torch.zeros(s, dtype=torch.int32) for n, s in shapes.items()}
    for group in apl.groups(shapes, level).values():
        for n, m in apl.covered_mask(shapes, group).items():
            counts[n] += m
    return counts


def test_layer_groups_are_disjoint_and_cover_exactly_the_blocks(scorer):
    shapes = {n: tuple(t.shape) for n, t in scorer.zoo.base.items() if t.is_floating_point()}
    parts = apl.groups(shapes, "layer")
    assert list(parts) == [f"layer.{i}" for i in range(6)]
    counts = _coverage(shapes, "layer")
    for n, c in counts.items():
        in_block = n.startswith("encoder.layer.")
        assert bool((c == (1 if in_block else 0)).all()), n


def test_hidden_groups_are_disjoint_and_cover_exactly_the_residual_writers(scorer):
    shapes = {n: tuple(t.shape) for n, t in scorer.zoo.base.items() if t.is_floating_point()}
    parts = apl.groups(shapes, "hidden")
    assert len(parts) == 384
    counts = _coverage(shapes, "hidden")
    writers = {n for n in shapes if n.startswith("encoder.layer.") and
               ("attention.output." in n or (".output." in n and "attention" not in n))}
    assert len(writers) == 6 * 8  # o and down weight + bias, two LayerNorms' weight + bias
    for n, c in counts.items():
        assert bool((c == (1 if n in writers else 0)).all()), n
    # group h is row h of every writer: entries of row h covered, nothing else
    mask = apl.covered_mask(shapes, parts["hidden.7"])
    down = "encoder.layer.3.output.dense.weight"
    assert mask[down][7].all() and mask[down].sum() == shapes[down][1]
    uncovered = sum(math.prod(s) for n, s in shapes.items() if n not in writers)
    assert uncovered > 0.5 * sum(math.prod(s) for s in shapes.values())  # embeddings, q/k/v, FFN up


def test_model_group_is_everything_and_unknown_level_is_named(scorer):
    parts = apl.groups(scorer.zoo.base, "model")
    assert set(parts["model"]) == set(scorer.zoo.base)
    with pytest.raises(ValueError, match="level must be one of"):
        apl.groups(scorer.zoo.base, "neuron")


def test_corrupt_replaces_only_the_group():
    base = {"encoder.layer.0.output.dense.weight": torch.zeros(3, 4), "encoder.layer.0.output.dense.bias": torch.zeros(3)}
    expert = {k: torch.ones_like(v) for k, v in base.items()}
    group = apl.groups(expert, "hidden")["hidden.1"]
    out = apl.corrupt(expert, base, group)
    assert out["encoder.layer.0.output.dense.weight"].tolist() == [[1] * 4, [0] * 4, [1] * 4]
    assert out["encoder.layer.0.output.dense.bias"].tolist() == [1, 0, 1]
    assert expert["encoder.layer.0.output.dense.weight"].eq(1).all()  # the input is not written over


# ---- tracing (Eq. 5-8) ----------------------------------------------------------------------------

def test_model_level_is_base_minus_expert_and_nothing_replaced_is_zero(scorer):
    zoo = scorer.zoo
    shots = few_shot(zoo.tasks["sentiment"], 5, seed=0)
    imp = apl.trace(scorer, zoo.base, zoo.experts["sentiment"], "sentiment", shots, "model")
    p_t = scorer.true_label_probability(zoo.experts["sentiment"], "sentiment", shots)
    p_b = scorer.true_label_probability(zoo.base, "sentiment", shots)
    assert imp.keys == ["model"] and imp.clean == pytest.approx(p_t)
    assert float(imp.values[0]) == pytest.approx(p_b - p_t, abs=1e-5)
    nothing = scorer.true_label_probabilities(zoo.experts["sentiment"], [apl.corrupt(zoo.experts["sentiment"], zoo.base, {})],
                                              "sentiment", shots)
    assert float(nothing[0]) - p_t == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("level", ["layer", "hidden"])
def test_batched_tracing_equals_the_naive_loop(scorer, level):
    zoo = scorer.zoo
    shots = few_shot(zoo.tasks["news"], 2, seed=0)
    only = [f"hidden.{h}" for h in range(3, 384, 32)] if level == "hidden" else None  # keeps the naive loop short
    batched = apl.trace(scorer, zoo.base, zoo.experts["news"], "news", shots, level, chunk=5, only=only)
    naive = apl.trace(scorer, zoo.base, zoo.experts["news"], "news", shots, level, naive=True, only=only)
    assert batched.keys == naive.keys
    torch.testing.assert_close(batched.values, naive.values, rtol=0, atol=2e-6)
    assert batched.values.abs().max() > 1e-4  # the interventions did change something


def test_tracing_through_another_head_uses_that_head(scorer):
    # the out-of-domain setting: expert "compare" read by the held-out task's frozen-base probe
    zoo = scorer.zoo
    task, probe = zoo.held_out("decimals", device=DEVICE)
    shots = few_shot(task, 2, seed=0)
    traced = apl.trace(scorer, zoo.base, zoo.experts["compare"], "decimals", shots, "layer", head=probe)
    by_hand = []
    clean = scorer.true_label_probability(zoo.experts["compare"], "decimals", shots, probe)
    for layer in range(6):
        corrupted = {n: zoo.base[n] if n.startswith(f"encoder.layer.{layer}.") else w
                     for n, w in zoo.experts["compare"].items()}
        by_hand.append(scorer.true_label_probability(corrupted, "decimals", shots, probe) - clean)
    torch.testing.assert_close(traced.values, torch.tensor(by_hand, dtype=torch.float64), rtol=0, atol=2e-6)
    assert traced.clean == pytest.approx(clean)
    own_head = apl.trace(scorer, zoo.base, zoo.experts["compare"], "compare", shots, "layer")  # same texts, own head
    assert not torch.allclose(own_head.values, traced.values)
    hidden = apl.trace(scorer, zoo.base, zoo.experts["compare"], "decimals", shots, "hidden", head=probe,
                       only=["hidden.5", "hidden.200"])
    naive = apl.trace(scorer, zoo.base, zoo.experts["compare"], "decimals", shots, "hidden", head=probe,
                      only=["hidden.5", "hidden.200"], naive=True)
    torch.testing.assert_close(hidden.values, naive.values, rtol=0, atol=2e-6)


def test_chance_level_expert_warns():
    class Stub:  # an expert that gets every few-shot example wrong
        class zoo:
            @staticmethod
            def task(name):
                return type("T", (), {"num_labels": 2})()

        def true_label_probability(self, params, task, examples, head=None):
            return 0.2

        def true_label_probabilities(self, params, variants, task, examples, head=None, chunk=None):
            return torch.full((len(variants),), 0.3)

        def params(self, sd):
            return sd

        def few_shot_batches(self, examples):
            return examples

        def logits(self, task, head, batches, params):
            return torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 1])

    base = {"encoder.layer.0.output.dense.weight": torch.zeros(2, 2)}
    with pytest.warns(UserWarning, match="at chance"):
        imp = apl.trace(Stub(), base, {k: v + 1 for k, v in base.items()}, "t", [("a", 1), ("b", 1)], "layer")
    assert imp.values.tolist() == pytest.approx([0.1])
    with pytest.raises(ValueError, match="empty"):
        apl.trace(Stub(), base, base, "t", [], "layer")
    with pytest.raises(KeyError, match="not layer-level partitions"):
        apl.trace(Stub(), base, base, "t", [("a", 1)], "layer", only=["layer.9"])


# ---- drop rates (Eq. 11, Fig. 3) and weights (Eq. 12) ------------------------------------------

def test_eq11_hand_worked():
    rates = apl.calibrated_drop_rates(torch.tensor([-0.5, 0.0, 0.2]), lam=0.9, eps=0.05, tau=5.0)
    # tanh(-0.1) = -0.0997 -> clipped to 0.85; tanh(0) = 0; tanh(0.04) = 0.03998
    assert rates.tolist() == pytest.approx([0.85, 0.9, 0.9 + math.tanh(0.04)])
    # more important (more negative) -> lower drop rate, never the other way
    small = apl.calibrated_drop_rates(torch.tensor([-1e-3, -1e-4]), 0.9, 0.05)
    assert small[0] < small[1] < 0.9
    normalised = apl.calibrated_drop_rates(torch.tensor([-1e-3, -1e-4]), 0.9, 0.05, tau=5.0, normalise=True)
    assert normalised[0] == pytest.approx(0.85) and normalised[1] == pytest.approx(0.9 + math.tanh(-0.1 / 5))


def test_linear_mapping_hand_worked_and_averages_lambda():
    rates = apl.linear_drop_rates(torch.tensor([-3.0, -1.0, -2.0, 0.0, 5.0]), lam=0.9, eps=0.04)
    assert rates.tolist() == pytest.approx([0.86, 0.90, 0.88, 0.92, 0.94])
    assert float(rates.mean()) == pytest.approx(0.9, abs=1e-15)
    ties = apl.linear_drop_rates(torch.tensor([-1.0, -1.0, 0.0]), lam=0.5, eps=0.1)
    assert ties.tolist() == pytest.approx([0.45, 0.45, 0.6])


def test_linear_mapping_expected_kept_count_equals_dare(scorer):
    zoo = scorer.zoo
    names = [n for n, t in zoo.base.items() if t.is_floating_point()]
    shapes = {n: tuple(zoo.base[n].shape) for n in names}
    for level, n_parts in (("layer", 6), ("hidden", 384)):
        keys = list(apl.groups(shapes, level))
        imp = apl.Importance("news", level, keys, -torch.rand(n_parts, generator=torch.Generator().manual_seed(0),
                                                                  dtype=torch.float64), 1.0, 1.0)
        rates, rate_level = apl.engine_rates(imp, apl.linear_drop_rates(imp.values, 0.9, 0.05), names)
        config = MergeConfig.build("dare_linear", 1, drop_rate=rates, rate_level=rate_level, rate_default=0.9)
        kept = sum(float(torch.broadcast_to(torch.as_tensor(broadcast_rate(config.densities(n)[0], shapes[n]),
                                                            dtype=torch.float64), shapes[n]).sum()) for n in names)
        total = sum(math.prod(s) for s in shapes.values())
        assert kept == pytest.approx(0.1 * total, abs=1e-6 * total), level


def _expected_kept(imp, rates, shapes, lam):
    names = list(shapes)
    engine, level = apl.engine_rates(imp, rates, names)
    config = MergeConfig.build("dare_linear", 1, drop_rate=engine, rate_level=level, rate_default=lam)
    return sum(float(torch.broadcast_to(torch.as_tensor(broadcast_rate(config.densities(n)[0], shapes[n]),
                                                        dtype=torch.float64), shapes[n]).sum()) for n in names)


@pytest.mark.parametrize("level", ["layer", "hidden"])
def test_the_budget_matched_eq11_keeps_dares_count_exactly(level):
    from conftest import bert_like
    shapes = {n: tuple(t.shape) for n, t in bert_like(n_layers=3, hidden=16).items() if t.is_floating_point()}
    keys = list(apl.groups(shapes, level))
    g = torch.Generator().manual_seed(1)
    imp = apl.Importance("news", level, keys, -0.3 * torch.rand(len(keys), generator=g, dtype=torch.float64), 1.0, 1.0)
    total = sum(math.prod(s) for s in shapes.values())
    for lam in (0.9, 0.99):
        eps = (1 - lam) / 2
        plain = apl.drop_rates(imp, lam, eps)
        assert _expected_kept(imp, plain, shapes, lam) > (1 - lam) * total * 1.01  # Eq. 11 keeps more: not matched
        matched = apl.drop_rates(imp, lam, eps, "tanh-matched", shapes=shapes)
        assert _expected_kept(imp, matched, shapes, lam) == pytest.approx((1 - lam) * total, rel=1e-9)
        assert torch.equal(torch.argsort(matched, stable=True), torch.argsort(plain, stable=True))  # order kept
    with pytest.raises(ValueError, match="needs the model's shapes"):
        apl.drop_rates(imp, 0.9, 0.05, "tanh-matched")


def test_budget_matching_by_hand():
    # sizes 1, 3; rates 0.5, 0.7: mean 0.65 → shift +0.05 to reach 0.7
    assert apl.budget_matched_rates([0.5, 0.7], [1, 3], 0.7).tolist() == pytest.approx([0.55, 0.75])
    # a rate that would leave [0, 1) is clipped and the others shift further to keep the budget
    clipped = apl.budget_matched_rates([0.0, 0.9], [1, 1], 0.1)
    assert clipped.tolist() == pytest.approx([0.0, 0.2]) and float(clipped.mean()) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one positive size per rate"):
        apl.budget_matched_rates([0.5], [0], 0.5)


def test_expert_weights_hand_worked():
    w = apl.expert_weights(torch.tensor([-0.5, 0.0]), tau=0.5)
    assert w.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    assert apl.expert_weights(torch.tensor([-0.3, -0.3, -0.3])).tolist() == pytest.approx([1 / 3] * 3)
    # MI-Task Arithmetic's weights sum to T: equal importances are plain Task Arithmetic
    assert apl.expert_weights(torch.tensor([-0.3, -0.3, -0.3]), total=3).tolist() == pytest.approx([1.0] * 3)
    assert apl.expert_weights(torch.tensor([-0.5, 0.0]), tau=0.5, total=2).tolist() == pytest.approx(
        [2 * math.e / (math.e + 1), 2 / (math.e + 1)])


def test_cocktail_weights_are_a_softmax_of_minus_loss_over_temperature():
    losses = torch.tensor([0.7, 0.2, 1.5])
    w = apl.cocktail_weights(losses, temperature=5.0)
    by_hand = torch.exp(-losses.double() / 5) / torch.exp(-losses.double() / 5).sum()
    torch.testing.assert_close(w, by_hand)
    assert float(w.sum()) == pytest.approx(1.0) and int(w.argmax()) == 1  # the lowest loss weighs most


@pytest.mark.parametrize("call, message", [
    (lambda: apl.calibrated_drop_rates(torch.tensor([-0.1]), 0.9, 0.05, tau=0), "tau must be > 0"),
    (lambda: apl.calibrated_drop_rates(torch.tensor([-0.1]), 0.9, -0.01), "epsilon must be"),
    (lambda: apl.calibrated_drop_rates(torch.tensor([-0.1]), 0.98, 0.05), r"λ ± ε must lie in \[0, 1\)"),
    (lambda: apl.linear_drop_rates(torch.tensor([-0.1]), 0.02, 0.05), r"λ ± ε must lie in \[0, 1\)"),
    (lambda: apl.calibrated_drop_rates(torch.zeros(4), 0.9, 0.05), "every importance is zero"),
    (lambda: apl.calibrated_drop_rates(torch.tensor([float("nan")]), 0.9, 0.05), "NaN"),
    (lambda: apl.expert_weights(torch.tensor([0.1]), tau=-1), "tau must be > 0"),
    (lambda: apl.expert_weights(torch.tensor([0.1]), total=0), "total must be a number > 0"),
    (lambda: apl.cocktail_weights(torch.tensor([0.1, 0.2]), temperature=0), "temperature must be > 0"),
])
def test_bad_settings_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- merging (Eq. 12) ----------------------------------------------------------------------------

def test_apl_with_zero_spread_is_dare(scorer):
    zoo = scorer.zoo
    experts = {t: zoo.experts[t] for t in ("news", "sentiment")}
    keys = [f"layer.{i}" for i in range(6)]
    imps = {t: apl.Importance(t, "layer", keys, -torch.linspace(0.01, 0.1, 6, dtype=torch.float64), 1.0, 1.0)
            for t in experts}
    merged = apl.merge(zoo.base, experts, imps, lam=0.9, eps=0.0, seed=3)
    dare = merge_state_dicts(zoo.base, list(experts.values()), "dare_linear", drop_rate=0.9, seed=3, progress=False)
    for n in dare:
        assert torch.equal(merged[n], dare[n]), n


def test_apl_layer_rates_reach_the_layers(scorer):
    zoo = scorer.zoo
    keys = [f"layer.{i}" for i in range(6)]
    imp = apl.Importance("news", "layer", keys, torch.tensor([-0.5, 0, 0, 0, 0, 0.5], dtype=torch.float64), 1.0, 1.0)
    merged = apl.merge(zoo.base, {"news": zoo.experts["news"]}, {"news": imp}, lam=0.5, eps=0.3, rescale=False)
    name = "encoder.layer.{}.intermediate.dense.weight"
    kept = [float((merged[name.format(i)] != zoo.base[name.format(i)]).float().mean()) for i in (0, 3, 5)]
    # rates 0.2 (important), 0.5, 0.8 (clipped tanh(±0.1) moves them only by 0.0997)
    assert kept[0] == pytest.approx(1 - (0.5 + math.tanh(-0.1)), abs=0.01)
    assert kept[1] == pytest.approx(0.5, abs=0.01)
    assert kept[2] == pytest.approx(1 - (0.5 + math.tanh(0.1)), abs=0.01)


def test_hidden_rates_become_per_row_vectors(scorer):
    names = list(scorer.zoo.base)
    keys = [f"hidden.{h}" for h in range(384)]
    imp = apl.Importance("news", "hidden", keys, torch.zeros(384, dtype=torch.float64), 1.0, 1.0)
    rates = torch.linspace(0.8, 0.9, 384, dtype=torch.float64)
    out, level = apl.engine_rates(imp, rates, names)
    assert level == "tensor" and len(out) == 48
    assert all(isinstance(v, PerRow) and torch.equal(v.values, rates) for v in out.values())


def test_gradient_scores_are_not_read_as_probabilities_by_eq_11():
    """Chapter 5's −|Σ Δ g| is a loss change: Eq. 11's tanh(I/τ₁) with τ₁ = 5 is set for P* − P. A
    loss-unit Importance needs normalise=True or the rank mapping; tracing's passes as it is."""
    values = torch.tensor([-0.9, -0.3, -0.01])
    traced = apl.Importance("news", "layer", ["layer.0", "layer.1", "layer.2"], values, 0.8, 1.0)
    scored = apl.Importance("news", "layer", ["layer.0", "layer.1", "layer.2"], values, 0.8, 1.0, units="loss")
    apl.drop_rates(traced, 0.9, 0.05)
    for mapping in ("tanh", "tanh-matched"):
        with pytest.raises(ValueError, match=r"news: these importances are in loss units .* normalise=True"):
            apl.drop_rates(scored, 0.9, 0.05, mapping, shapes={})
    torch.testing.assert_close(apl.drop_rates(scored, 0.9, 0.05, normalise=True),
                               apl.drop_rates(traced, 0.9, 0.05, normalise=True))
    torch.testing.assert_close(apl.drop_rates(scored, 0.9, 0.05, "linear"), apl.drop_rates(traced, 0.9, 0.05, "linear"))


def test_the_package_marks_its_gradient_scores_in_loss_units(scorer):
    from merging_helpers import taylor
    zoo = scorer.zoo
    task = "news"
    few = few_shot(zoo.tasks[task], 2, seed=0)
    assert taylor.gradient_importance(scorer, zoo.base, zoo.experts[task], task, few, "layer").units == "loss"
    assert apl.trace(scorer, zoo.base, zoo.experts[task], task, few, "model").units == "probability"
