"""The in-memory merge with the fused kernel (merging_helpers.fast.in_memory) against the reference engine."""
import functools

import pytest
import torch
from conftest import bert_like, expert_of

from merging_helpers import recipes
from merging_helpers.apl import Importance
from merging_helpers.fast import compiled, fused, in_memory

HIDDEN = 520  # the FFN matrices have 2080 × 520 > 2**20 entries: two kernel pieces and the bracketed top-k


@functools.lru_cache(maxsize=2)
def _model(n_experts=3):  # read only by the tests
    base = bert_like(n_layers=2, hidden=HIDDEN, seed=0)
    return base, [expert_of(base, seed=1 + t, scale=0.01 * (1 + t)) for t in range(n_experts)]


def _apl_options(n_experts):
    g = torch.Generator().manual_seed(0)
    imps = [Importance(f"e{t}", "layer", ["layer.0", "layer.1"], -torch.rand(2, generator=g, dtype=torch.float64),
                       0.5, 0.5) for t in range(n_experts)]
    return dict(importances=imps, drop_rate=0.8, eps=0.1, seed=2)


CASES = {  # every method chapter 8 merges with, and options that change the kernel's path
    "task_arithmetic": dict(lam=0.7),
    "ties": dict(density=0.2),
    "ties weighted": dict(density=0.3, weights=[0.5, 1.0, 1.5], lam=1.3),
    "magnitude": dict(density=0.1),
    "dare_linear": dict(density=0.2, seed=3),
    "dare_ties": dict(density=0.2, seed=1),
    "della": dict(density=0.2, epsilon=0.0, seed=0),  # not the kernel's: the reference engine merges it
    "dp": dict(alpha=0.8),
    "rms_adaptive": dict(p_default=0.8, drop_scale=3.0, scale="std", seed=4),
    "apl": None,
}


@pytest.mark.parametrize("case", CASES)
def test_the_same_tensors_as_the_reference_engine_bit_for_bit(case):
    base, experts = _model()
    method = case.split()[0]
    options = CASES[case] or _apl_options(len(experts))
    want = recipes.merge_state_dicts(base, experts, method, progress=False, **options)
    got = in_memory.merge_state_dicts(base, experts, method, progress=False, **options)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"])


@pytest.mark.skipif(compiled.load() is None, reason="no compiled kernel here")
def test_the_kernel_merges_what_it_implements_and_only_that(monkeypatch):
    base, experts = _model(2)
    calls = []
    real = fused.FusedMerge.__call__
    monkeypatch.setattr(fused.FusedMerge, "__call__", lambda self, name, *a: calls.append(name) or real(self, name, *a))
    in_memory.merge_state_dicts(base, experts, "ties", density=0.2, progress=False)
    assert sorted(calls) == sorted(n for n, t in base.items() if t.is_floating_point())
    calls.clear()
    in_memory.merge_state_dicts(base, experts, "ties", density=0.2, progress=False, kernel="reference")
    in_memory.merge_state_dicts(base, experts, "della", density=0.2, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="kernel='c'.*della"):
        in_memory.merge_state_dicts(base, experts, "della", density=0.2, progress=False, kernel="c")


def test_a_merged_entry_beyond_float32_is_refused_in_the_engines_words():
    base = {"w": torch.zeros(4, 4)}
    experts = [{"w": torch.full((4, 4), 3e38)} for _ in range(2)]
    for merge in (recipes.merge_state_dicts, in_memory.merge_state_dicts):
        with pytest.raises(OverflowError, match="'w': 16 merged entries overflow torch.float32"):
            merge(base, experts, "task_arithmetic", progress=False)


def test_bad_options_are_refused_before_any_merging():
    base, experts = _model(2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        in_memory.merge_state_dicts(base, experts, "ties", density=0.2, kernel="fast")
    with pytest.raises(ValueError, match="density"):
        in_memory.merge_state_dicts(base, experts, "ties", density=1.5)
