"""Merge methods as data (merging_helpers.methods): the records say what each method does,
and a new method is one entry that the reference engine, the streaming merge and the
fused kernel all follow."""
import pytest
import torch

from merging_helpers import methods
from merging_helpers.config import MergeConfig
from merging_helpers.consensus import disjoint_merge, elect_sign
from merging_helpers.drop import magnitude_keep_mask
from merging_helpers.fast.checkpoints import load_state_dict
from merging_helpers.fast.fused import fused_supported
from merging_helpers.fast.streaming import merge_folders
from merging_helpers.methods import METHODS, Method
from merging_helpers.recipes import merge_state_dicts, merge_tensor


def test_the_methods_and_what_they_do():
    assert sorted(METHODS) == ["breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "magnitude",
                               "task_arithmetic", "ties"]
    assert [METHODS[m].drop for m in ("task_arithmetic", "magnitude", "dare_linear", "della")] == \
        [None, "magnitude", "random", "magprune"]
    assert [METHODS[m].rescale for m in ("ties", "dare_ties", "della")] == [None, "inverse", "keep_prob"]
    assert [METHODS[m].elects for m in ("dare_linear", "ties")] == [False, True]
    # where the weights enter the election decides the divisor of the disjoint merge
    assert METHODS["ties"].divisor(weighted_election=False) == "count"
    assert METHODS["ties"].divisor(weighted_election=True) == "weight_sum"
    assert METHODS["dare_ties"].divisor(weighted_election=True) == "nothing"


def test_a_bad_record_is_refused():
    with pytest.raises(ValueError, match="drop must be one of"):
        Method("x", 3, drop="random-ish", combine="sum")
    with pytest.raises(ValueError, match="combine must be one of"):
        Method("x", 3, drop=None, combine="average")
    with pytest.raises(ValueError, match="method must be one of"):
        MergeConfig.build("tie", 2, density=0.5)


@pytest.fixture
def trim_and_sum(monkeypatch):
    """A new method, one entry: TIES's trim + election, summing the agreeing deltas."""
    m = Method("trim_elect_sum", 3, drop="magnitude", combine="elect", divide_when_weighted="nothing")
    monkeypatch.setitem(METHODS, m.name, m)
    return m


def test_a_new_method_is_one_entry(trim_and_sum, families, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    experts = [base + 0.1 * torch.randn(6, 5, generator=g) for _ in range(3)]
    w = [1.0, 2.0, 0.5]
    got = merge_tensor("w", base, experts, "trim_elect_sum", density=0.4, weights=w, weighted_election=True)
    kept = [(e - base) * magnitude_keep_mask(e - base, 0.4) for e in experts]  # by hand, from the parts
    by_hand = base + disjoint_merge(kept, elect_sign(kept, weights=w), "nothing", w)
    assert torch.equal(got, by_hand)
    # the streaming merge follows the record too, through the compiled kernel where it applies
    config = MergeConfig.build("trim_elect_sum", 2, density=0.3, weights=[1.0, 0.5], weighted_election=True)
    assert fused_supported(config, "cpu")
    base_dir, expert_dirs = families["llama-bf16-sharded"]
    out = merge_folders(base_dir, expert_dirs, tmp_path / "o", config=config, progress=False)
    ref = merge_state_dicts(load_state_dict(base_dir), [load_state_dict(d) for d in expert_dirs], config=config,
                            progress=False)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_methods_docstring_table_matches_the_records():
    rows = [line.split() for line in methods.__doc__.splitlines() if line.strip().split(" ")[0] in METHODS]
    assert sorted(r[0] for r in rows) == sorted(METHODS)
    for row in rows:
        m = METHODS[row[0]]
        assert ("elect" in row) == m.elects, row


def test_the_facts_other_modules_need_are_read_from_the_records():
    """Randomness and the mergekit name live in the records; compare, sweeps and mergekit_yaml read them."""
    from merging_helpers import compare, mergekit_yaml, sweeps
    from merging_helpers.methods import METHODS, PLANNED, Method, registry
    assert sweeps.RANDOM_METHODS == {n for n, m in registry().items() if m.drop in ("random", "magprune")}
    assert {"apl", "rms_adaptive"} <= sweeps.RANDOM_METHODS and "dp" not in sweeps.RANDOM_METHODS
    assert set(mergekit_yaml.SHARED_METHODS) == {n for n, m in registry().items() if m.mergekit}
    assert Method("new", 3, drop="random", combine="elect").random
    assert not Method("new", 3, drop="magnitude", combine="elect").random
    for name, method in {"DARE": "dare_linear", "TIES": "ties", "DELLA": "della", "Task Arithmetic": "task_arithmetic"}.items():
        assert compare.CONTENDERS[name].random == METHODS[method].random
        assert compare.CONTENDERS[name].budgeted == METHODS[method].needs_rate
    for name, method in {"DP (DPPA's pruning)": "dp", "RMS-adaptive": "rms_adaptive"}.items():
        assert compare.CONTENDERS[name].random == PLANNED[method].random


def test_a_planned_method_refuses_a_hand_built_config():
    """A planned method's config comes from its plan (which reads the model): building one by hand is refused."""
    with pytest.raises(ValueError, match="'dp' builds its config from the whole model"):
        MergeConfig.build("dp", 2, density=0.5)
    config = MergeConfig.build("magnitude", 2, density=0.5)
    with pytest.raises(ValueError, match="give its options, not a config"):
        merge_state_dicts({"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}] * 2, "dp", config=config)
