"""Chapter 6's DPPA: Eqs. 1–5 on a hand-worked model, the achieved pruning rate, OWL's rates,
DPA's bands and the factor searches."""
import pytest
import torch

from merging_helpers import dppa

from conftest import _bert_sd

Q0, D0 = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.weight"
Q1, D1 = "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.weight"
EMB = "embeddings.word_embeddings.weight"


def hand_model():
    return {Q0: torch.tensor([4.0, 1, 1, 1]), D0: torch.tensor([1.0, 1, 1, 1]),
            Q1: torch.tensor([1.0, 1, -1, 1]), D1: torch.tensor([-8.0, 1, 1, 1]), EMB: torch.tensor([3.0, 0, 0, 0])}


def test_significance_by_hand():
    assert dppa.significance(torch.tensor([4.0, 1, 1, 1]), n=2) == 4.0  # mean 1.75: only 4 > 3.5
    assert dppa.significance(torch.tensor([1.0, -1, 1, 1]), n=2) == 0.0
    assert dppa.significance([torch.tensor([4.0, 1, 1, 1]), torch.ones(4)], n=2) == 4.0  # mean 1.375: 4 > 2.75
    assert dppa.significance(torch.zeros(5)) == 0.0  # no division by zero
    with pytest.raises(ValueError, match="N must be > 0"):
        dppa.significance(torch.ones(3), n=0)


def test_dp_rates_by_hand():
    # layer sig (n = 2): [4, 8] → dif = [2, −2] → norm [0.08, −0.08]
    # Eq. 2 as printed: linear sig [4, 0, 0, 8], sizes 4 each → one mean over the model, 3 →
    # dif' [−1, 3, 3, −5] → norm ·0.08/5 = [−0.016, 0.048, 0.048, −0.08]
    rates = dppa.dp_rates(hand_model(), alpha=0.5, n_layer=2, n_linear=2)
    assert rates[Q0] == pytest.approx(0.564) and rates[D0] == pytest.approx(0.628)
    assert rates[Q1] == pytest.approx(0.468) and rates[D1] == pytest.approx(0.34)
    # the per-layer reading: layer 0 [4, 0] → dif' [−2, 2]; layer 1 [0, 8] → dif' [4, −4] → norm /4·0.08
    per_layer = dppa.dp_rates(hand_model(), alpha=0.5, n_layer=2, n_linear=2, eq2_mean="layer")
    assert per_layer[Q0] == pytest.approx(0.54) and per_layer[D0] == pytest.approx(0.62)
    assert per_layer[Q1] == pytest.approx(0.50) and per_layer[D1] == pytest.approx(0.34)
    with pytest.raises(ValueError, match="eq2_mean must be one of"):
        dppa.dp_rates(hand_model(), 0.5, eq2_mean="block")
    assert rates[EMB] == 0.5  # outside the blocks: α
    assert sum(rates[n] for n in (Q0, D0, Q1, D1)) / 4 == pytest.approx(0.5)
    torch.testing.assert_close(dppa.layer_fluctuation([4.0, 8.0]), torch.tensor([2.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(dppa.linear_fluctuation([0.0, 8.0], [4, 12]), torch.tensor([6.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(dppa.normalise(torch.tensor([2.0, -4.0]), 0.1), torch.tensor([0.05, -0.1], dtype=torch.float64))
    assert dppa.normalise(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_dp_keeps_alpha_overall_on_a_bert_shaped_model():
    g = torch.Generator().manual_seed(0)
    sd, _ = _bert_sd(0)
    deltas = {n: torch.randn(t.shape, generator=g) * (1 + 3 * (n.startswith("encoder.layer.1")))
              for n, t in sd.items() if t.is_floating_point()}
    for alpha in (0.5, 0.9):
        rates = dppa.dp_rates(deltas, alpha)
        assert len(set(round(r, 6) for r in rates.values())) > 2  # the rates do move
        pruned = dppa.magnitude_prune(deltas, rates)
        total = sum(t.numel() for t in deltas.values())
        dropped = sum(int((p == 0).sum()) for p in pruned.values())
        assert abs(dropped / total - alpha) <= len(deltas) / total  # rounding: at most one entry per tensor
        # the more significant layer (×4 scale with the same shape has the same relative outliers, so compare by
        # what the rates say): every tensor of a layer shares norm(dif_l)


def test_owl_rates_average_alpha_and_spare_outlier_layers():
    g = torch.Generator().manual_seed(1)
    deltas = {Q0: torch.randn(1000, generator=g), D0: torch.randn(1000, generator=g),
              Q1: torch.randn(1000, generator=g), D1: torch.randn(1000, generator=g), EMB: torch.randn(10, generator=g)}
    deltas[Q1][:50] *= 40  # layer 1 has many outliers
    rates = dppa.owl_rates(deltas, 0.7, lam=0.08, m=3)
    assert rates[Q1] == rates[D1] < 0.7 < rates[Q0] == rates[D0]
    assert (rates[Q0] + rates[Q1]) / 2 == pytest.approx(0.7)
    assert rates[Q0] - rates[Q1] == pytest.approx(0.16)  # the full 2λ spread
    assert rates[EMB] == 0.7


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha must be in"):
        dppa.dp_rates(hand_model(), 1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        dppa.dp_rates(hand_model(), 0.5, lam=-0.1)
    with pytest.raises(ValueError, match="N must be > 0"):
        dppa.dp_rates(hand_model(), 0.5, n_layer=0)
    with pytest.warns(UserWarning, match="clipped"):
        rates = dppa.dp_rates(hand_model(), 0.02, lam=0.5, n_layer=2, n_linear=2)
    assert min(rates.values()) == 0.0
    with pytest.raises(ValueError, match="strictly decreasing"):
        dppa.bands(torch.ones(10), [0.8, 0.9])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        dppa.bands(torch.ones(10), [1.0])
    with pytest.raises(ValueError, match="2 bands but 1 factors"):
        dppa.amplify(torch.ones(4), dppa.bands(torch.arange(4.0), [0.75, 0.5]), [1.0])
    with pytest.raises(KeyError, match="no rate"):
        dppa.magnitude_prune(hand_model(), {Q0: 0.5})


def test_bands_partition_the_kept_entries_and_unit_factors_give_dp():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(200, generator=g)
    masks = dppa.bands(delta, [0.9, 0.8, 0.5])
    assert [int(m.sum()) for m in masks] == [20, 20, 60]
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()
    assert delta[masks[0]].abs().min() >= delta[masks[1]].abs().max()  # band 0 holds the largest |δ|
    unit = dppa.amplify(delta, masks, [1.0, 1.0, 1.0])
    torch.testing.assert_close(unit, dppa.magnitude_prune({"w": delta}, {"w": 0.5})["w"])
    scaled = dppa.amplify(delta, masks, [2.0, 1.0, 0.0])
    torch.testing.assert_close(scaled[masks[0]], 2 * delta[masks[0]])
    assert (scaled[masks[2]] == 0).all()


def test_greedy_and_the_two_search_methods_find_a_separable_optimum():
    best, path = dppa.greedy_factor(lambda f: -(f - 1.3) ** 2)
    assert best == pytest.approx(1.3)
    assert [f for f, _ in path] == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4])  # rise, then one step of fall
    target = [1.3, 0.7]
    score = lambda fs: -sum((f - t) ** 2 for f, t in zip(fs, target))
    for search in (dppa.search_method1, dppa.search_method2):
        factors, paths = search(score, 2)
        assert factors == pytest.approx(target) and len(paths) == 2
    with pytest.raises(ValueError, match="step must be > 0"):
        dppa.greedy_factor(lambda f: 0.0, step=0)


def test_dp_bands_are_disjoint_nested_and_unit_factors_give_dp_at_the_last_level():
    g = torch.Generator().manual_seed(3)
    sd, _ = _bert_sd(0)
    deltas = {n: torch.randn(t.shape, generator=g) * (1 + 3 * (n.startswith("encoder.layer.1")))
              for n, t in sd.items() if t.is_floating_point()}
    masks = dppa.dp_bands(deltas, [0.9, 0.6])
    high = dppa.magnitude_prune(deltas, dppa.dp_rates(deltas, 0.9))
    low = dppa.magnitude_prune(deltas, dppa.dp_rates(deltas, 0.6))
    for n, (b0, b1) in masks.items():
        assert not (b0 & b1).any()
        assert torch.equal(b0, high[n] != 0)  # band 0 is DP at 0.9 (random deltas have no exact zeros)
    unit = dppa.amplified(deltas, masks, [1.0, 1.0])
    for n in deltas:
        torch.testing.assert_close(unit[n], low[n])  # DPA with all factors 1 equals DP
    doubled = dppa.amplified(deltas, masks, [2.0, 1.0])
    torch.testing.assert_close(doubled[Q1][masks[Q1][0]], 2 * deltas[Q1][masks[Q1][0]])


def test_dare_bands_split_dares_survivors_and_unit_factors_give_dare_back():
    g = torch.Generator().manual_seed(5)
    sd, _ = _bert_sd(0)
    deltas = {n: torch.randn(t.shape, generator=g) for n, t in sd.items() if t.is_floating_point()}
    dropped = {n: d * (torch.rand(d.shape, generator=g) >= 0.9) / 0.1 for n, d in deltas.items()}  # DARE at 0.9
    masks = dppa.dare_bands(deltas, dropped, 0.9)
    dp = dppa.magnitude_prune(deltas, dppa.dp_rates(deltas, 0.9))
    for n, (b0, b1) in masks.items():
        assert not (b0 & b1).any() and torch.equal(b0 | b1, dropped[n] != 0)
        assert torch.equal(b0, (dropped[n] != 0) & (dp[n] != 0))  # band 0: survivors DP also keeps
    unit = dppa.amplified(dropped, masks, [1.0, 1.0])
    reduced = dppa.amplified(dropped, masks, [0.5, 1.0])
    for n in deltas:
        torch.testing.assert_close(unit[n], dropped[n])
        torch.testing.assert_close(reduced[n][masks[n][0]], 0.5 * dropped[n][masks[n][0]])
    with pytest.raises(ValueError, match=f"{Q0} is"):
        dppa.dare_bands(deltas, {**dropped, Q0: dropped[Q0][:2]})
    with pytest.raises(KeyError, match="no DARE-pruned tensor"):
        dppa.dare_bands(deltas, {n: v for n, v in dropped.items() if n != Q0})


def test_an_exact_budget_shifts_the_linear_maps_so_dp_still_prunes_alpha():
    # α = 0.95 on the hand model: Eq. 5 gives Q0 1.014 and D0 1.078 (clipped to just below 1), Q1 0.918, D1 0.79;
    # clipped, the four maps prune (2 + 1.708) / 4 = 0.927 < α. One shift s with (2 + 1.708 + 2s) / 4 = 0.95:
    # s = 0.046, so Q1 0.964 and D1 0.836 (Q0, D0 stay at the top).
    with pytest.warns(UserWarning, match="clipped"):
        clipped = dppa.dp_rates(hand_model(), alpha=0.95, n_layer=2, n_linear=2)
    maps = (Q0, D0, Q1, D1)
    assert sum(clipped[n] for n in maps) / 4 == pytest.approx(0.927, abs=1e-5)
    exact = dppa.dp_rates(hand_model(), alpha=0.95, n_layer=2, n_linear=2, budget="exact")
    assert [exact[n] for n in maps] == pytest.approx([1.0, 1.0, 0.964, 0.836], abs=1e-5)
    assert sum(exact[n] for n in maps) / 4 == pytest.approx(0.95, abs=1e-9) and exact[EMB] == 0.95
    unclipped = dppa.dp_rates(hand_model(), alpha=0.5, n_layer=2, n_linear=2)   # nothing to shift: the same rates
    assert dppa.dp_rates(hand_model(), 0.5, n_layer=2, n_linear=2, budget="exact") == pytest.approx(unclipped, abs=1e-9)
    with pytest.raises(ValueError, match="budget must be one of"):
        dppa.dp_rates(hand_model(), 0.5, budget="renormalise")


def test_an_exact_budget_holds_on_a_bert_shaped_model_at_the_ends():
    g = torch.Generator().manual_seed(0)
    sd, _ = _bert_sd(0)
    deltas = {n: torch.randn(t.shape, generator=g) * (1 + 3 * (n.startswith("encoder.layer.1")))
              for n, t in sd.items() if t.is_floating_point()}
    total = sum(t.numel() for t in deltas.values())
    for alpha in (0.0, 0.999):
        rates = dppa.dp_rates(deltas, alpha, lam=0.2, budget="exact")
        achieved = sum(rates[n] * deltas[n].numel() for n in deltas) / total
        assert achieved == pytest.approx(alpha, abs=1e-6)
        pruned = dppa.magnitude_prune(deltas, rates)
        dropped = sum(int((p == 0).sum()) for p in pruned.values())
        assert abs(dropped / total - alpha) <= len(deltas) / total  # rounding: at most one entry per tensor


def test_owl_takes_the_same_exact_budget():
    g = torch.Generator().manual_seed(1)
    sd, _ = _bert_sd(0)
    deltas = {n: torch.randn(t.shape, generator=g) ** 3 * (1 + 5 * n.startswith("encoder.layer.0"))
              for n, t in sd.items() if t.is_floating_point()}
    total = sum(t.numel() for t in deltas.values())
    with pytest.warns(UserWarning, match="clipped"):
        clipped = dppa.owl_rates(deltas, 0.999, lam=0.2)
    assert sum(clipped[n] * deltas[n].numel() for n in deltas) / total < 0.999 - 1e-4   # clipping misses α
    exact = dppa.owl_rates(deltas, 0.999, lam=0.2, budget="exact")
    assert sum(exact[n] * deltas[n].numel() for n in deltas) / total == pytest.approx(0.999, abs=1e-6)
    with pytest.raises(ValueError, match="owl_rates: budget must be one of"):
        dppa.owl_rates(deltas, 0.5, budget="refuse")


# ---- DP as a planned method ("dp"): the same rates from streamed significances, both front doors

def _experts_on_a_bert(n_experts=2):
    g = torch.Generator().manual_seed(1)
    base, _ = _bert_sd(0)
    def delta(shape, scale):  # heavy-tailed, as fine-tunes' deltas are: 2 % of entries 30× larger
        spikes = 1 + 29 * (torch.rand(shape, generator=g) < 0.02)
        return torch.randn(shape, generator=g) * spikes * scale

    experts = [{n: t + delta(t.shape, 0.01 + 0.03 * t_ * n.startswith("encoder.layer.1"))
                if t.is_floating_point() else t for n, t in base.items()} for t_ in range(n_experts)]
    return base, experts


@pytest.mark.parametrize("chunk", [1 << 18, 100])  # one block per tensor, and many
def test_streamed_significances_equal_the_whole_blocks(chunk, monkeypatch):
    from merging_helpers.tensor_source import StateDictSource
    monkeypatch.setattr(dppa, "SIG_CHUNK", chunk)
    base, experts = _experts_on_a_bert()
    source = StateDictSource(base, experts, ["a", "b"])
    layers, linears = dppa._structure(source.shapes)
    for t, (sig_layers, sig_linears) in enumerate(dppa.streamed_significances(source, 5.0, 3.0)):
        deltas = {n: experts[t][n].float() - base[n].float() for n in source.shapes}
        want_l = [dppa.significance([deltas[n] for n in names], 5.0) for names in layers.values()]
        want_k = [dppa.significance([deltas[n] for n in names], 3.0) for names in linears.values()]
        assert sig_layers == pytest.approx(want_l, rel=1e-12) and sig_linears == pytest.approx(want_k, rel=1e-12)
        assert min(want_l) > 0 and min(want_k) > 0  # outliers were found: the check compares something


def test_dp_by_name_is_dp_rates_then_magnitude_pruning_and_the_sum():
    from merging_helpers.recipes import merge_state_dicts
    base, experts = _experts_on_a_bert(3)
    got = merge_state_dicts(base, experts, "dp", alpha=0.8, lam=0.5, progress=False)
    floating = [n for n, t in base.items() if t.is_floating_point()]
    pruned = []
    for e in experts:  # the chapter's from-the-parts route: dp_rates, then magnitude_prune
        deltas = {n: e[n].float() - base[n].float() for n in floating}
        pruned.append(dppa.magnitude_prune(deltas, dppa.dp_rates(deltas, 0.8)))
    for n in floating:
        torch.testing.assert_close(got[n], base[n] + 0.5 * sum(p[n] for p in pruned), rtol=0, atol=1e-6)
    rates = dppa.dp_rates({n: experts[0][n].float() - base[n].float() for n in floating}, 0.8)
    assert len({round(r, 6) for r in rates.values()}) > 3  # the rates do differ per map


@pytest.mark.parametrize("options, error, match", [
    (dict(), TypeError, "dp needs alpha"),
    (dict(alpha=1.0), ValueError, r"alpha must be in \[0, 1\)"),
    (dict(alpha=0.5, density=0.3), TypeError, r"unknown option\(s\) \['density'\]"),
    (dict(alpha=0.5, eq2_mean="block"), ValueError, "eq2_mean must be one of"),
    (dict(alpha=0.5, lam=float("nan")), ValueError, "lam must be a finite number"),
])
def test_dp_bad_options_fail_before_reading(options, error, match, monkeypatch):
    from merging_helpers.recipes import merge_state_dicts
    monkeypatch.setattr(dppa, "streamed_significances", lambda *a, **k: pytest.fail("read before checking"))
    base, experts = _experts_on_a_bert()
    with pytest.raises(error, match=match):
        merge_state_dicts(base, experts, "dp", progress=False, **options)
