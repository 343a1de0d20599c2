"""The k-th largest |Δ| and exact top-k masks (merging_helpers.selection, chapter 2)."""
import pytest
import torch

from merging_helpers.drop import global_magnitude_threshold, magnitude_keep_mask
from merging_helpers.selection import global_kth_largest_abs, kth_largest_abs, top_k_mask


@pytest.mark.parametrize("n", [1000, 200_000])  # topk path and radix path
def test_topk_and_radix_agree_and_keep_exactly_k(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for k in (1, n // 3, n):
        assert kth_largest_abs(x, k, "topk") == kth_largest_abs(x, k, "radix") == torch.sort(x.abs(), descending=True).values[k - 1]
        assert int(top_k_mask(x, k).sum()) == k


def test_ties_at_threshold_keep_exactly_k_lowest_indices_first():
    x = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 3.0, 1.0])  # three |x| = 1 tie for 2 places
    for algorithm in ("topk", "radix"):
        assert top_k_mask(x, 4, algorithm).tolist() == [False, True, True, True, False, True, False]
    many_ties = torch.randint(-3, 4, (100_000,), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert int(magnitude_keep_mask(many_ties, 0.37).sum()) == round(0.37 * 100_000)


def test_global_threshold_matches_concatenation_and_keeps_at_least_k():
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(shape, generator=g) * (i + 1) for i, shape in enumerate([(300, 200), (7,), (1000, 90)])}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    k = round(0.2 * flat.numel())
    assert global_kth_largest_abs(tensors, k) == torch.sort(flat.abs(), descending=True).values[k - 1]
    threshold = global_magnitude_threshold(lambda: iter(tensors.values()), 0.2)  # a callable streams passes
    assert sum(int((t.abs() >= threshold).sum()) for t in tensors.values()) == k  # no ties in random floats
    ties = [torch.ones(10), torch.ones(10)]
    assert sum(int((t.abs() >= global_magnitude_threshold(ties, 0.3)).sum()) for t in ties) == 20  # ties: at least k
