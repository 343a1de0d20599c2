"""Chapter 7's RMS-adaptive drop rates: p_k^t and the dispersion switch by hand, the min-rate
rescale, and the whole method at λ = 0 against the engine's DARE-TIES."""
import math

import pytest
import torch

from merging_helpers import recipes, rms_adaptive as ra

from conftest import _bert_sd

Q0, D0 = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.weight"


def test_rms_and_matrices():
    d = torch.full((2, 8), 0.5)
    assert ra.matrix_rms(d) == pytest.approx(0.5)
    assert ra.matrix_rms(d, slide_formula=True) == pytest.approx(0.5 * 4 / 16)  # ‖δ‖_F / N
    assert ra.matrix_rms(torch.zeros(3, 3)) == 0.0
    big = torch.randn(700, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 3 blocks
    assert ra.matrix_rms(big) == pytest.approx(float(big.square().mean().sqrt()), rel=1e-6)
    assert ra.is_matrix(Q0, d) and ra.is_matrix(D0, d)
    assert not ra.is_matrix("encoder.layer.0.attention.self.query.bias", torch.zeros(8))
    assert not ra.is_matrix("embeddings.word_embeddings.weight", d)
    table = ra.rms_table({"a": {Q0: d, "embeddings.word_embeddings.weight": d}})
    assert table == {"a": {Q0: pytest.approx(0.5)}}


def test_rates_by_hand_below_the_cv_threshold():
    table = {"a": {Q0: 1.0, D0: 3.0}, "b": {Q0: 2.0, D0: 6.0}}  # averages 2, 4: CV = √2/3 → global means 1.5, 4.5
    rates, info = ra.adaptive_rates(table, p_default=0.5, lam=0.1)
    assert info["cv"] == pytest.approx(100 * math.sqrt(2) / 3) and not info["own_mean"]
    assert rates["a"][Q0] == pytest.approx(0.55) and rates["a"][D0] == pytest.approx(0.65)
    assert rates["b"][Q0] == pytest.approx(0.45) and rates["b"][D0] == pytest.approx(0.35)
    # the same λ read in units of 1/σ (σ of the attention rms values = 0.5, of the ffn values = 1.5)
    std_rates, info = ra.adaptive_rates(table, p_default=0.5, lam=0.1, scale="std")
    assert std_rates["a"][Q0] == pytest.approx(0.6) and std_rates["b"][D0] == pytest.approx(0.4)


def test_the_dispersion_switch_at_cv_50():
    at_50 = {"a": {Q0: 1.0}, "b": {Q0: 3.0}, "c": {Q0: 2.0}}  # averages 1, 3, 2: sample σ 1, CV exactly 50 → global mean 2
    rates, info = ra.adaptive_rates(at_50, 0.5, 0.1)
    assert info["cv"] == pytest.approx(50.0) and not info["own_mean"]
    assert rates["a"][Q0] == pytest.approx(0.6)
    above = {"a": {Q0: 1.0, D0: 1.0}, "b": {Q0: 10.0, D0: 10.0}}  # CV ≈ 116: each expert against its own mean
    aware, info = ra.adaptive_rates(above, 0.5, 0.1)
    assert info["own_mean"] and all(p == pytest.approx(0.5) for v in aware.values() for p in v.values())
    unaware, info = ra.adaptive_rates(above, 0.5, 0.1, aware=False)
    assert not info["own_mean"] and unaware["a"][Q0] == pytest.approx(0.95) and unaware["b"][Q0] == pytest.approx(0.05)
    with pytest.warns(UserWarning, match="4 of 4 drop rates were clipped"):  # 0.5 ± 0.2 · 4.5
        clipped, info = ra.adaptive_rates(above, 0.5, 0.2, aware=False, clip=(0.1, 0.9))
    assert clipped["a"][Q0] == 0.9 and clipped["b"][Q0] == 0.1 and info["clipped"] == 4


def test_the_slides_cv_from_their_own_numbers():
    # the slides' high-dispersion table: three experts' average RMS and their CV of 113.4 %
    slides = {"a": {Q0: 8.499e-4}, "b": {Q0: 1.243e-4}, "c": {Q0: 1.296e-4}}
    assert ra.cv_percent(slides) == pytest.approx(113.4, abs=0.05)
    population = torch.tensor([8.499e-4, 1.243e-4, 1.296e-4], dtype=torch.float64)
    assert float(population.std(unbiased=False) / population.mean() * 100) == pytest.approx(92.6, abs=0.05)  # not theirs


def test_a_lambda_that_moves_no_rate_warns():
    table = {"a": {Q0: 1e-4, D0: 3e-4}, "b": {Q0: 2e-4, D0: 6e-4}}  # RMS values of a real delta's size
    with pytest.warns(ra.IneffectiveDropScale, match=r"λ = 0.1 \(scale='raw'\) moves no drop rate.*scale='std'"):
        ra.adaptive_rates(table, 0.9, 0.1)  # a raw 0.1 moves rates by ~1e-5
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", ra.IneffectiveDropScale)
        ra.adaptive_rates(table, 0.9, 0.1, scale="std")  # one σ moves a rate by 0.1: no warning
        ra.adaptive_rates(table, 0.9, 0.0)  # λ = 0 is DARE-TIES on purpose


def test_min_rate_rescale_and_ablations():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50, 40, generator=g), torch.randn(50, 40, generator=g)]
    plain = ra.merge_tensor(Q0, deltas, [0.5, 0.2], seed=3, rescale=False)
    torch.testing.assert_close(ra.merge_tensor(Q0, deltas, [0.5, 0.2], seed=3), plain / 0.8)  # 1/(1 − min p)
    no_drop = ra.merge_tensor(Q0, deltas, [0.0, 0.0], elect=False)
    torch.testing.assert_close(no_drop, (deltas[0] + deltas[1]) / 2)
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    torch.testing.assert_close(ra.merge_tensor(Q0, deltas, [0.0, 0.0]), (stacked * agree).sum(0) / agree.sum(0).clamp_min(1))
    with pytest.raises(ValueError, match="2 deltas but 1 rates"):
        ra.merge_tensor(Q0, deltas, [0.5])


def test_lambda_zero_is_dare_ties_with_the_same_seed():
    sd, _ = _bert_sd(0)
    base = {n: t for n, t in sd.items()}
    g = torch.Generator().manual_seed(1)
    experts = {t: {n: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for n, v in sd.items()}
               for t in ("a", "b", "c")}
    deltas = {t: {n: e[n] - base[n] for n in base if base[n].is_floating_point()} for t, e in experts.items()}
    rates, _ = ra.adaptive_rates(ra.rms_table(deltas), p_default=0.7, lam=0.0)
    ours = ra.merge(base, experts, rates, p_default=0.7, seed=5)
    theirs = recipes.merge_state_dicts(base, list(experts.values()), "dare_ties", density=0.3, seed=5, lam=1.0,
                                       progress=False)
    for n in base:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-7)
    moved, _ = ra.adaptive_rates(ra.rms_table(deltas), p_default=0.7, lam=0.05, scale="std")
    assert any(abs(p - 0.7) > 1e-3 for v in moved.values() for p in v.values())
    changed = ra.merge(base, experts, moved, p_default=0.7, seed=5)
    assert any(not torch.equal(changed[n], ours[n]) for n in rates["a"])


def test_bad_input_is_named():
    table = {"a": {Q0: 1.0}}
    with pytest.raises(ValueError, match="p_default must be in"):
        ra.adaptive_rates(table, 1.0, 0.1)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ra.adaptive_rates(table, 0.5, -1)
    with pytest.raises(ValueError, match="CV threshold must be > 0"):
        ra.adaptive_rates(table, 0.5, 0.1, cv_threshold=0)
    with pytest.raises(ValueError, match="clip must satisfy"):
        ra.adaptive_rates(table, 0.5, 0.1, clip=(0.6, 0.9))
    with pytest.raises(ValueError, match="scale must be"):
        ra.adaptive_rates(table, 0.5, 0.1, scale="sigma")
    with pytest.raises(KeyError, match="not experts"):
        ra.merge({"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}}, {"b": {}}, 0.5)
    assert math.isfinite(ra.cv_percent({"a": {Q0: 0.0}, "b": {Q0: 0.0}}))


def test_the_engine_merge_equals_the_readable_one():
    sd, _ = _bert_sd(0)
    g = torch.Generator().manual_seed(2)
    experts = {t: {n: (v + s * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for n, v in sd.items()}
               for t, s in (("a", 0.01), ("b", 0.03))}
    deltas = {t: {n: e[n] - sd[n] for n in sd if sd[n].is_floating_point()} for t, e in experts.items()}
    rates, _ = ra.adaptive_rates(ra.rms_table(deltas), p_default=0.6, lam=0.2, scale="std")
    assert len({round(p, 6) for v in rates.values() for p in v.values()}) > 4  # the rates really differ
    for elect, rescale in ((True, True), (False, True), (True, False)):
        ours = ra.merge(sd, experts, rates, p_default=0.6, seed=4, elect=elect, rescale=rescale)
        for n, b in sd.items():
            if not b.is_floating_point():
                continue
            p = [rates[t].get(n, 0.6) for t in experts]
            by_hand = b + ra.merge_tensor(n, [deltas[t][n] for t in experts], p, seed=4, elect=elect, rescale=rescale)
            torch.testing.assert_close(ours[n], by_hand, rtol=1e-5, atol=1e-6)


def test_the_smallest_rescale_rule():
    deltas = [torch.ones(4, 300), -torch.ones(4, 300)]
    kept = recipes.drop_and_rescale(deltas, "random", [0.5, 0.8], name="x", rescale="smallest")
    # each expert's survivors are divided by 1 − min(0.5, 0.2) = 0.8, not by its own keep rate
    values = torch.cat([k.abs().unique() for k in kept])
    torch.testing.assert_close(values[values > 0], torch.full_like(values[values > 0], 1 / 0.8))
    with pytest.raises(ValueError, match="does not drop at random"):
        ra.MergeConfig.build("ties", 2, density=0.5, rescale="smallest")


def test_a_zero_delta_gets_the_rate_its_rms_of_zero_gives():
    table = ra.rms_table({"a": {Q0: torch.zeros(4, 4)}, "b": {Q0: torch.full((4, 4), 2.0)}})
    assert table["a"][Q0] == 0.0
    rates, info = ra.adaptive_rates(table, p_default=0.5, lam=0.1, aware=False)  # mean rms 1 → 0.5 + 0.1 · 1
    assert rates["a"][Q0] == pytest.approx(0.6) and rates["b"][Q0] == pytest.approx(0.4)


@pytest.mark.parametrize("kw, match", [(dict(p_default="x"), r"p_default must be a finite number, got 'x'"),
                                        (dict(clip=(0.5,)), r"clip must be a pair of numbers \(low, high\), got \(0.5,\)"),
                                        (dict(lam="0.1"), r"lam must be a finite number, got '0.1'")])
def test_badly_typed_options_are_named(kw, match):
    table = {"a": {Q0: 1.0, D0: 3.0}, "b": {Q0: 2.0, D0: 6.0}}
    with pytest.raises(TypeError, match=match):
        ra.adaptive_rates(table, **{"p_default": 0.5, "lam": 0.1, **kw})


def test_a_nan_delta_is_named_not_reported_as_a_bad_drop_rate():
    with pytest.raises(ValueError, match=r"expert 'a': the RMS of .* is nan: its delta has NaN or inf entries"):
        ra.adaptive_rates({"a": {Q0: float("nan")}, "b": {Q0: 1.0}}, 0.9, 0.1)
