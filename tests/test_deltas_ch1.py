"""Chapter 1's addition to deltas.delta_quantiles: signed quantiles (DPPA's offset table)."""
import pytest
import torch

from merging_helpers.deltas import delta_quantiles


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
