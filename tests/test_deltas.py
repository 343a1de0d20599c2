"""Delta parameters and their statistics, by hand (merging_helpers.deltas, chapter 1)."""
import math

import pytest
import torch
from conftest import small_pair

from merging_helpers.deltas import (
    apply_delta,
    check_compatible,
    cosine_similarity_matrix,
    delta_quantiles,
    rms_by_partition,
    sign_disagreement,
    task_vector,
    task_vectors,
)


def test_task_vector_apply_delta_round_trip():
    base = {"a": torch.randn(4, 3).to(torch.bfloat16), "ids": torch.arange(3)}
    expert = {"a": (base["a"].float() + 0.25).to(torch.bfloat16), "ids": torch.arange(3)}
    delta = task_vector(base, expert)
    assert set(delta) == {"a"} and delta["a"].dtype == torch.float32
    back = apply_delta(base, delta)
    assert torch.equal(back["a"], expert["a"]) and back["a"].dtype == torch.bfloat16
    assert back["ids"] is not base["ids"] and torch.equal(back["ids"], base["ids"])
    assert len(task_vectors(base, {"x": expert, "y": base})) == 2


def test_delta_statistics_by_hand():
    d1 = {"encoder.layer.0.attention.self.query.weight": torch.tensor([1.0, -2.0, 0.0, 3.0]),
          "encoder.layer.0.output.dense.weight": torch.tensor([4.0, 0.0])}
    d2 = {"encoder.layer.0.attention.self.query.weight": torch.tensor([1.0, 2.0, 5.0, -3.0]),
          "encoder.layer.0.output.dense.weight": torch.tensor([-4.0, 0.0])}
    torch.testing.assert_close(delta_quantiles(d1, [0.0, 0.5, 1.0]), torch.tensor([0.0, 1.5, 4.0]))
    # entries with ≥ 2 nonzero deltas: 1,2,4 of the first tensor and 1 of the second; 3 disagree
    assert sign_disagreement([d1, d2]) == pytest.approx(3 / 4)
    cos = cosine_similarity_matrix([d1, d2])
    assert cos[0, 1].item() == pytest.approx((1 - 4 - 9 - 16) / (math.sqrt(30) * math.sqrt(55)), rel=1e-6)
    rms = rms_by_partition(d1, ("layer", "role"))
    assert rms == pytest.approx({"layer.0.attention": math.sqrt(14 / 4), "layer.0.ffn": math.sqrt(16 / 2)})


def test_delta_quantiles_sampled_for_big_models():
    g = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(300_000, generator=g), "b": torch.randn(100_000, generator=g)}
    exact = delta_quantiles(delta, [0.5, 0.9])
    sampled = delta_quantiles(delta, [0.5, 0.9], max_exact=1000, sample_size=50_000)
    torch.testing.assert_close(sampled, exact, atol=0.02, rtol=0)
    torch.testing.assert_close(exact, torch.tensor([0.6745, 1.6449]), atol=0.01, rtol=0)  # half-normal quantiles


def test_check_compatible_errors_name_the_problem():
    base, expert = small_pair()
    with pytest.raises(ValueError, match="empty"):
        check_compatible(base, [])
    with pytest.raises(ValueError, match="math.*missing.*embeddings.LayerNorm.weight"):
        check_compatible(base, {"math": {"encoder.layer.0.output.dense.weight": expert["encoder.layer.0.output.dense.weight"]}})
    with pytest.raises(ValueError, match=r"expert 1: tensor 'embeddings.LayerNorm.weight' has shape \(5,\)"):
        check_compatible(base, [expert, expert | {"embeddings.LayerNorm.weight": torch.ones(5)}])
    with pytest.raises(TypeError, match="float16"):
        check_compatible(base, [expert | {"embeddings.LayerNorm.weight": torch.ones(4, dtype=torch.float16)}])
    bad = expert | {"encoder.layer.0.output.dense.weight": expert["encoder.layer.0.output.dense.weight"].clone()}
    bad["encoder.layer.0.output.dense.weight"][2, 1] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.0.output.dense.weight.*NaN"):
        check_compatible(base, [bad], ["code"])
    with pytest.warns(UserWarning, match="really this expert's base"):
        check_compatible(base, {"unrelated": {k: torch.randn_like(v) * 3 for k, v in base.items()}})


def test_check_compatible_tells_a_large_finite_delta_from_an_infinite_one():
    base = {"w": torch.zeros(4, 4)}
    check_compatible(base, [{"w": torch.full((4, 4), 1e20)}])  # finite entries whose norm overflows float32: accepted
    for bad in (float("inf"), float("-inf")):
        expert = {"w": torch.zeros(4, 4)}
        expert["w"][3, 0] = bad
        with pytest.raises(ValueError, match="'w'.*inf"):
            check_compatible(base, [expert])
    big = {"w": torch.full((4, 4), -3e38)}  # finite inputs whose delta overflows
    with pytest.raises(ValueError, match="'w'"):
        check_compatible(big, [{"w": torch.full((4, 4), 3e38)}])


def test_signed_quantiles_by_hand():
    d = {"a": torch.tensor([-3.0, -1.0, 0.0]), "b": torch.tensor([[2.0, 5.0]])}
    # sorted signed values: -3, -1, 0, 2, 5 → min, an interpolated 0.125 (position 0.5), median, max
    torch.testing.assert_close(delta_quantiles(d, [0.0, 0.125, 0.5, 1.0], signed=True),
                               torch.tensor([-3.0, -2.0, 0.0, 5.0]))
    # the default is unchanged: quantiles of |Δ| (0, 1, 2, 3, 5)
    torch.testing.assert_close(delta_quantiles(d, [0.0, 0.5, 1.0]), torch.tensor([0.0, 2.0, 5.0]))


def test_signed_quantiles_sampled_and_symmetric():
    g = torch.Generator().manual_seed(1)
    d = {"a": torch.randn(200_000, generator=g), "b": torch.randn(50_000, generator=g)}
    exact = delta_quantiles(d, [0.1, 0.5, 0.9], signed=True)
    sampled = delta_quantiles(d, [0.1, 0.5, 0.9], signed=True, max_exact=1000, sample_size=40_000)
    torch.testing.assert_close(sampled, exact, atol=0.03, rtol=0)
    assert exact[0].item() == pytest.approx(-exact[2].item(), abs=0.02)  # N(0, 1) is symmetric
    assert exact[1].item() == pytest.approx(0.0, abs=0.01)
    # |Δ| quantiles of a symmetric distribution: q of |x| = (1+q)/2 quantile of x
    torch.testing.assert_close(delta_quantiles(d, [0.8])[0], delta_quantiles(d, [0.9], signed=True)[0], atol=0.02, rtol=0)


def test_sign_disagreement_counts_by_hand_and_additive():
    from merging_helpers.deltas import sign_disagreement, sign_disagreement_counts
    d1 = {"a": torch.tensor([1.0, -2.0, 0.0, 3.0]), "b": torch.tensor([4.0, 0.0, -1.0])}
    d2 = {"a": torch.tensor([1.0, 2.0, 5.0, -3.0]), "b": torch.tensor([-4.0, 0.0, 2.0])}
    d3 = {"a": torch.tensor([0.0, 0.0, 0.0, 1.0]), "b": torch.tensor([0.0, 7.0, 0.0])}
    # a: entry 0 (+,+,0) agrees, 1 (−,+,0) disagrees, 2 (0,+,0) has one nonzero, 3 (+,−,+) disagrees
    # b: entry 0 (+,−,0) disagrees, 1 (0,0,+) one nonzero, 2 (−,+,0) disagrees
    assert sign_disagreement_counts([d1, d2, d3]) == (4, 5)
    parts = [sign_disagreement_counts([{k: d[k]} for d in (d1, d2, d3)]) for k in ("a", "b")]
    assert parts == [(2, 3), (2, 2)]
    assert sign_disagreement([d1, d2, d3]) == pytest.approx(4 / 5)
    assert sign_disagreement([{"a": torch.zeros(3)}, {"a": torch.ones(3)}]) == 0.0  # nothing contested
