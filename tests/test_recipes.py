"""The reference engine against peft's merge_utils, its invariants, its bad-input checks and pinned results (merging_helpers.recipes, chapters 2–3)."""
import hashlib
import math

import pytest
import torch
from conftest import bert_like, expert_of, small_pair
from peft.utils import merge_utils as peft

from merging_helpers import recipes
from merging_helpers.consensus import weighted_sum
from merging_helpers.drop import (
    magnitude_keep_mask,
    random_keep_mask,
)
from merging_helpers.partitions import partition_key
from merging_helpers.methods import METHODS
from merging_helpers.recipes import merge_state_dicts, merge_tensor
from merging_helpers.rng import EntryRandoms
from merging_helpers.selection import kth_largest_abs


def test_merge_entry_points_reject_bad_options_before_work():
    base, expert = small_pair()
    name, b = "encoder.layer.0.output.dense.weight", base["encoder.layer.0.output.dense.weight"]
    cases = [
        (dict(method="tiess", density=0.5), ValueError, "method must be one of"),
        (dict(method="ties"), ValueError, "needs density or drop_rate"),
        (dict(method="ties", density=0.5, drop_rate=0.5), ValueError, "not both"),
        (dict(method="dare_linear", drop_rate=1.0), ValueError, r"drop_rate = 1.0 .*\[0, 1\)"),
        (dict(method="dare_linear", drop_rate={"layer.0.ffn": 1.5}), ValueError, r"drop_rate\['layer.0.ffn'\]"),
        (dict(method="ties", density=0.5, weights=[1.0, 2.0]), ValueError, "one weight per expert"),
        (dict(method="ties", density=0.5, election="majority"), ValueError, "election must be one of"),
        (dict(method="ties", density=0.5, election_weights="torch"), TypeError, "election_weights"),
        (dict(method="dare_linear", drop_rate=0.5, rescale="l2"), ValueError, "rescale must be one of"),
        (dict(method="dare_linear", drop_rate=0.5, rescale="factor"), ValueError, "rescale_factor"),
        (dict(method="ties", density=0.5, lam=float("nan")), ValueError, "lam"),
        (dict(method="ties", density=[0.5, 0.5]), ValueError, "2 rates for 1 experts"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            merge_tensor(name, b, [expert[name]], **kwargs)
    with pytest.raises(ValueError, match=r"expert 0: tensor '.*' has shape \(4, 8\)"):
        merge_tensor(name, b, [b.T.contiguous()], "ties", density=0.5)
    with pytest.raises(ValueError, match=r"keys \['layer.9.ffn'\] match no tensor"):
        merge_state_dicts(base, [expert], "dare_linear", drop_rate={"layer.0.ffn": 0.5, "layer.9.ffn": 0.5, "norm": 0.1},
                          progress=False)
    with pytest.raises(KeyError, match="no rate for partition 'norm'"):
        merge_state_dicts(base, [expert], "dare_linear", drop_rate={"layer.0.ffn": 0.5}, progress=False)
    with pytest.raises(ValueError, match="magnitude_scope"):
        merge_state_dicts(base, [expert], "dare_ties", drop_rate=0.5, magnitude_scope="model", progress=False)
    with pytest.raises(ValueError, match="empty"):
        merge_state_dicts(base, [], "ties", density=0.5, progress=False)


def test_per_partition_drop_rates_are_honoured():
    base = bert_like(hidden=32)
    expert = expert_of(base, 1)
    rates = {"layer.0.attention": 0.9, "layer.0.ffn": 0.5, "layer.0.norm": 0.0, "layer.1.attention": 0.1,
             "layer.1.ffn": 0.0, "layer.1.norm": 0.2, "embedding": 0.3, "norm": 0.6}
    merged = merge_state_dicts(base, [expert], "dare_linear", drop_rate=rates, rate_level="layer_role", progress=False)
    dropped, counts = {}, {}
    for name, b in base.items():
        if b.is_floating_point():
            key = partition_key(name, "layer_role")
            dropped[key] = dropped.get(key, 0) + int((merged[name] == b).sum())
            counts[key] = counts.get(key, 0) + b.numel()
    for key, p in rates.items():
        n = counts[key]
        assert abs(dropped[key] / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1 / n, key


def test_per_expert_rates_list():
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    merged = merge_tensor("encoder.layer.0.intermediate.dense.weight", base["encoder.layer.0.intermediate.dense.weight"],
                          [e["encoder.layer.0.intermediate.dense.weight"] for e in experts], "dare_linear",
                          drop_rate=[0.0, {"layer.0.ffn": 0.5}], weights=[1.0, 0.0])
    torch.testing.assert_close(merged, experts[0]["encoder.layer.0.intermediate.dense.weight"])  # expert 0: no drop


def test_whole_model_magnitude_scope_keeps_the_global_fraction():
    base = bert_like(hidden=32)
    expert = expert_of(base, 1)
    merged = merge_state_dicts(base, [expert], "magnitude", density=0.25, magnitude_scope="model", progress=False)
    floats = [n for n, b in base.items() if b.is_floating_point()]
    kept = sum(int((merged[n] != base[n]).sum()) for n in floats)
    total = sum(base[n].numel() for n in floats)
    assert kept == round(0.25 * total)
    fractions = [float((merged[n] != base[n]).float().mean()) for n in floats]
    assert max(fractions) - min(fractions) > 0.1  # per-tensor densities vary under a global threshold


NO_DROP = {"task_arithmetic": {}, "magnitude": {"density": 1.0}, "dare_linear": {"drop_rate": 0.0},
           "ties": {"density": 1.0}, "dare_ties": {"drop_rate": 0.0}, "della": {"density": 1.0, "epsilon": 0.0},
           "breadcrumbs": {"density": 1.0}, "breadcrumbs_ties": {"density": 1.0}}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_expert_without_dropping_returns_the_expert(method, dtype):
    base = bert_like(dtype=dtype)
    expert = expert_of(base, 3)
    merged = merge_state_dicts(base, [expert], method, progress=False, **NO_DROP[method])
    for name in base:
        assert merged[name].dtype == base[name].dtype
        if dtype == torch.float32:  # (θ_e − θ_b) + θ_b can differ from θ_e by a rounding in float32
            torch.testing.assert_close(merged[name], expert[name], rtol=0, atol=1e-6)
        else:  # half precision inputs are exact in float32 arithmetic
            assert torch.equal(merged[name], expert[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_and_device_follow_the_input(dtype):
    base = bert_like(dtype=dtype)
    merged = merge_state_dicts(base, [expert_of(base, 1), expert_of(base, 2)], "dare_ties", drop_rate=0.5, progress=False)
    assert all(merged[n].dtype == base[n].dtype and merged[n].device == base[n].device for n in base)


def test_inputs_are_not_modified():
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    copies = [{k: v.clone() for k, v in sd.items()} for sd in [base] + experts]
    merge_state_dicts(base, experts, "ties", density=0.3, progress=False)
    for sd, copy in zip([base] + experts, copies):
        assert all(torch.equal(sd[k], copy[k]) for k in sd)


@pytest.mark.parametrize("method,rate", [("dare_ties", {"drop_rate": 0.7}), ("della", {"density": 0.4, "epsilon": 0.1})])
def test_random_masks_do_not_depend_on_tensor_order(method, rate):
    base = bert_like()
    experts = [expert_of(base, 1), expert_of(base, 2)]
    forward = merge_state_dicts(base, experts, method, seed=5, progress=False, **rate)
    rev = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    backward = merge_state_dicts(rev(base), [rev(e) for e in experts], method, seed=5, progress=False, **rate)
    assert all(torch.equal(forward[n], backward[n]) for n in base)
    other_seed = merge_state_dicts(base, experts, method, seed=6, progress=False, **rate)
    assert not torch.equal(forward["encoder.layer.0.intermediate.dense.weight"], other_seed["encoder.layer.0.intermediate.dense.weight"])


def test_magnitude_chunks_with_the_tensor_threshold_match_the_whole_tensor():
    base = torch.randn(200, 9)
    experts = [base + torch.randn(200, 9), base - torch.randn(200, 9)]
    whole = merge_tensor("w", base, experts, "ties", density=0.3)
    thresholds = [kth_largest_abs(e - base, round(0.3 * base.numel())) for e in experts]
    chunks = [merge_tensor("w", base[r], [e[r] for e in experts], "ties", density=0.3, thresholds=thresholds)
              for r in (slice(0, 77), slice(77, 200))]
    assert torch.equal(torch.cat(chunks), whole)


T, SHAPE = 3, (40, 25)  # 1000 entries: density · n is an integer for the densities below


WEIGHTS = [0.5, 1.0, 2.0]


def test_task_arithmetic_matches_peft(deltas):
    expected = peft.task_arithmetic(deltas, torch.tensor(WEIGHTS))
    torch.testing.assert_close(recipes.task_arithmetic(deltas, weights=WEIGHTS), expected)
    torch.testing.assert_close(weighted_sum(deltas, WEIGHTS), expected)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_magnitude_prune_matches_peft(deltas, density):
    torch.testing.assert_close(deltas[0] * magnitude_keep_mask(deltas[0], density), peft.prune(deltas[0], density, "magnitude"))
    expected = peft.magnitude_prune(deltas, torch.tensor(WEIGHTS), density)
    torch.testing.assert_close(recipes.magnitude(deltas, densities=[density] * T, weights=WEIGHTS), expected)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("density", [0.2, 0.7, 1.0])
def test_ties_matches_peft(deltas, method, density):
    expected = peft.ties(deltas, torch.tensor(WEIGHTS), density, majority_sign_method=method)
    ours = recipes.ties(deltas, densities=[density] * T, weights=WEIGHTS, election=method, weighted_election=False)
    torch.testing.assert_close(ours, expected)


@pytest.fixture
def same_masks_in_peft(monkeypatch):
    """Make peft's torch.bernoulli return *our* DARE keep masks, one per call, in
    expert order; everything else (multiply, /density, weights, election) is peft's."""
    def install(deltas, density, name, seed):
        masks = [random_keep_mask(d, 1.0 - density, EntryRandoms(seed, name, t)).float() for t, d in enumerate(deltas)]
        calls = iter(masks)
        monkeypatch.setattr(torch, "bernoulli", lambda probs: next(calls))
        return masks
    return install


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_dare_linear_matches_peft_with_same_mask(deltas, same_masks_in_peft, density):
    same_masks_in_peft(deltas, density, "w", seed=7)
    expected = peft.dare_linear(deltas, torch.tensor(WEIGHTS), density)
    ours = recipes.dare_linear(deltas, densities=[density] * T, weights=WEIGHTS, name="w", seed=7)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_matches_peft_with_same_mask(deltas, same_masks_in_peft, method):
    masks = same_masks_in_peft(deltas, 0.3, "w", seed=3)
    expected = peft.dare_ties(deltas, torch.tensor(WEIGHTS), 0.3, majority_sign_method=method)
    ours = recipes.dare_ties(deltas, densities=[0.3] * T, weights=WEIGHTS, name="w", seed=3, election=method)
    torch.testing.assert_close(ours, expected)
    assert 0.25 < masks[0].mean() < 0.35  # the masks really drop ~70 %


# ---- merges pinned to the hashes the engine gave before its second edition (commit 419019f):
# reshaping the engine must not change a single bit of any merge

def pinned_family(seed=0, dtype=torch.float32, hidden=16, n_layers=2, n_experts=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embeddings.word_embeddings.weight": (50, hidden), "embeddings.LayerNorm.weight": (hidden,)}
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        shapes |= {p + "attention.self.query.weight": (hidden, hidden), p + "attention.self.query.bias": (hidden,),
                   p + "attention.output.dense.weight": (hidden, hidden),
                   p + "intermediate.dense.weight": (4 * hidden, hidden),
                   p + "output.dense.weight": (hidden, 4 * hidden), p + "output.LayerNorm.weight": (hidden,)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    experts = [{n: (v.float() + 0.05 * (t + 1) * torch.randn(v.shape, generator=g)).to(dtype) for n, v in base.items()}
               for t in range(n_experts)]
    return base, experts


def digest(sd):
    h = hashlib.sha256()
    for n in sorted(sd):
        h.update(n.encode())
        h.update(sd[n].contiguous().view(torch.uint8).numpy().tobytes() if sd[n].dtype != torch.float32
                 else sd[n].numpy().tobytes())
    return h.hexdigest()[:24]


CASES = {
    "task_arithmetic": ("task_arithmetic", {"lam": 0.6}),
    "task_arithmetic_weights": ("task_arithmetic", {"weights": [0.5, 0.3, 0.2]}),
    "magnitude": ("magnitude", {"density": 0.3}),
    "dare_linear": ("dare_linear", {"drop_rate": 0.9, "seed": 3, "lam": 0.7}),
    "dare_linear_l1": ("dare_linear", {"drop_rate": 0.9, "seed": 1, "rescale": "l1"}),
    "ties": ("ties", {"density": 0.2, "lam": 1.0}),
    "ties_frequency": ("ties", {"density": 0.5, "election": "frequency"}),
    "ties_weighted_elect": ("ties", {"density": 0.4, "weights": [1.0, 2.0, 0.5], "weighted_election": True}),
    "ties_model_scope": ("ties", {"density": 0.3, "magnitude_scope": "model"}),
    "dare_ties": ("dare_ties", {"density": 0.3, "seed": 2}),
    "dare_ties_mergekit": ("dare_ties", {"density": 0.3, "seed": 2, "weights": [0.3, 0.3, 0.4], "weighted_election": True}),
    "della": ("della", {"density": 0.4, "epsilon": 0.1, "seed": 5}),
    "per_partition": ("dare_ties", {"drop_rate": [{"attention": 0.5, "ffn": 0.8, "embedding": 0.3, "norm": 0.0},
                                                  0.6, {"attention": 0.2, "ffn": 0.9, "embedding": 0.1, "norm": 0.1}],
                                    "rate_level": "role", "seed": 4}),
    "rescale_factor": ("magnitude", {"density": 0.5, "rescale": "factor", "rescale_factor": {"attention": 2.0, "ffn": 1.5},
                                     "rate_level": "role", "rate_default": 1.0}),
}

PINNED = {
 "task_arithmetic/float32": "21590bc8fec9359d63b55440",
 "task_arithmetic_weights/float32": "82e7d03f8c53ff482c57fbaf",
 "magnitude/float32": "4c6afd58cdd130abb50d9dc1",
 "dare_linear/float32": "1a9003360037b4a68537e4dd",
 "dare_linear_l1/float32": "857ffb97eeaad6066d0e8fbe",
 "ties/float32": "664806e1b09b8c86bc81d481",
 "ties_frequency/float32": "d4bd17c69323667f38b4e371",
 "ties_weighted_elect/float32": "bd6c09355b11729f403d9a78",
 "ties_model_scope/float32": "298bead7ab616dc89c362870",
 "dare_ties/float32": "0d91e7e22286975693f8388b",
 "dare_ties_mergekit/float32": "e084d35f11ad3a5d21f781a9",
 "della/float32": "bc5564dfa4a70628373df999",
 "per_partition/float32": "885f5096c1a75026b638acaf",
 "rescale_factor/float32": "e0f5cac68e149480122d4aed",
 "task_arithmetic/bfloat16": "38c0d00bbd83222d592b2d31",
 "task_arithmetic_weights/bfloat16": "ca04a5d6b46799546f6e258f",
 "magnitude/bfloat16": "1d388d4d900083177d36fddd",
 "dare_linear/bfloat16": "96edabf3f5e8783caedf07f0",
 "dare_linear_l1/bfloat16": "5601ffded476779c50b00f6a",
 "ties/bfloat16": "edb926d0e0b530164a49590e",
 "ties_frequency/bfloat16": "27f3b8f155f887ca659f3abf",
 "ties_weighted_elect/bfloat16": "7004b40d1b9c7a71eb750b76",
 "ties_model_scope/bfloat16": "70d99c0a170d9a71d1ce321d",
 "dare_ties/bfloat16": "676549cf7450baca3b86e333",
 "dare_ties_mergekit/bfloat16": "799d72af51645d7100ec92ac",
 "della/bfloat16": "e9f3134ad094349c45c0f6f2",
 "per_partition/bfloat16": "f061f962f0576a484ff9c099",
 "rescale_factor/bfloat16": "2f4d16eae36fea37ac3658e0",
}


@pytest.mark.parametrize("key", sorted(PINNED))
def test_merge_is_bit_identical_to_the_first_edition(key):
    case, dtype = key.split("/")
    method, kw = CASES[case]
    base, experts = pinned_family(dtype=getattr(torch, dtype))
    assert digest(merge_state_dicts(base, experts, method, progress=False, **kw)) == PINNED[key]


# ---- badly shaped arguments are named before any work (bad input, round 3) ------------------

def _pair():
    base = {"encoder.layer.0.attention.self.query.weight": torch.randn(4, 4), "embeddings.LayerNorm.weight": torch.ones(4)}
    return base, {k: v + 0.1 for k, v in base.items()}


@pytest.mark.parametrize("call, error, match", [
    (lambda b, e: merge_state_dicts(b, [e], ["ties"], progress=False), TypeError, r"method must be a method's name.*got a list"),
    (lambda b, e: merge_state_dicts(b, [e], {"m": 1}, progress=False), TypeError, r"got a dict"),
    (lambda b, e: merge_state_dicts(b, None, "task_arithmetic", progress=False), TypeError, r"experts must be a list of state dicts, got NoneType"),
    (lambda b, e: merge_state_dicts(b, e, "task_arithmetic", progress=False), TypeError, r"got one state dict: wrap it in a list"),
    (lambda b, e: merge_state_dicts([b], [e], "task_arithmetic", progress=False), TypeError, r"the base must be a state dict .* got list"),
    (lambda b, e: merge_state_dicts({**b, "x": 3}, [{**e, "x": 3}], "task_arithmetic", progress=False), TypeError, r"the base: 'x' is a int"),
    (lambda b, e: merge_state_dicts({k: v.to("meta") for k, v in b.items()}, [e], "task_arithmetic", progress=False),
     ValueError, r"is on the meta device and holds no data"),
    (lambda b, e: merge_state_dicts(b, [e], "magnitude", density=0.5, thresholds=["a"], progress=False),
     ValueError, r"thresholds must be one \|Δ\| threshold .* per expert, 1 in all, got \['a'\]"),
    (lambda b, e: merge_state_dicts(b, [e], "magnitude", density=0.5, thresholds=[0.1, 0.2], progress=False),
     ValueError, r"1 in all, got \[0.1, 0.2\]"),
])
def test_a_badly_shaped_argument_is_named(call, error, match):
    base, expert = _pair()
    with pytest.raises(error, match=match):
        call(base, expert)
