"""Invariants of the merge engine: unbiased DARE, honoured per-partition rates, exact
top-k, dtype round trips, identity merges, reproducible and order-free randomness."""
import math

import numpy as np
import pytest
import torch

from merging_helpers import recipes
from merging_helpers.drop import global_magnitude_threshold, magnitude_keep_mask, magprune_keep, magprune_keep_prob, random_keep_mask
from merging_helpers.partitions import partition_key
from merging_helpers.recipes import MERGE_METHODS, merge_state_dicts, merge_tensor
from merging_helpers.rng import BLOCK, EntryRandoms, block_words, derive_seed, keep_threshold
from merging_helpers.selection import global_kth_largest_abs, kth_largest_abs, top_k_mask

from conftest import bert_like, expert_of


# ---- DARE is unbiased; rates are honoured ---------------------------------------------


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_preserves_expected_delta_per_entry(p):
    delta = torch.linspace(-1, 1, 64)
    runs = 3000
    total = sum(recipes.drop_and_rescale([delta], "random", [1 - p], name="t", seed=s)[0] for s in range(runs))
    # Δ̂_i = Δ_i · Bernoulli(1−p)/(1−p): variance Δ_i² p/(1−p); 5 standard errors
    tolerance = 5 * delta.abs() * math.sqrt(p / (1 - p) / runs) + 1e-6
    assert ((total / runs - delta).abs() <= tolerance).all()


def test_della_keep_prob_and_unbiased_rescale():
    delta = torch.randn(4, 101, generator=torch.Generator().manual_seed(0))
    prob = magprune_keep_prob(delta, 0.5, 0.2)
    assert torch.allclose(prob.min(1).values, torch.full((4,), 0.3)) and torch.allclose(prob.max(1).values, torch.full((4,), 0.7))
    assert torch.allclose(prob.mean(1), torch.full((4,), 0.5))
    assert torch.equal(prob.argmax(1), delta.abs().argmax(1))  # largest |Δ| is the most likely kept
    runs = 2000
    mean = sum(recipes.drop_and_rescale([delta], "magprune", [0.5], name="d", seed=s, epsilon=0.2)[0] for s in range(runs)) / runs
    tolerance = 5 * delta.abs() * torch.sqrt((1 - prob) / prob / runs) + 1e-6
    assert ((mean - delta).abs() <= tolerance).all()
    mask, _ = magprune_keep(delta, 0.5, 0.2, EntryRandoms(0, "d", 0))
    assert abs(mask.float().mean() - 0.5) < 5 * math.sqrt(0.25 / mask.numel())


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


# ---- magnitude selection -------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 200_000])  # topk path and radix path
def test_topk_and_radix_agree_and_keep_exactly_k(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for k in (1, n // 3, n):
        assert kth_largest_abs(x, k, "topk") == kth_largest_abs(x, k, "radix") == torch.sort(x.abs(), descending=True).values[k - 1]
        assert int(top_k_mask(x, k).sum()) == k


def test_ties_at_threshold_keep_exactly_k_lowest_indices_first():
    x = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 3.0, 1.0])  # three |x| = 1 tie for 2 places
    for method in ("topk", "radix"):
        assert top_k_mask(x, 4, method).tolist() == [False, True, True, True, False, True, False]
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


# ---- identity, dtypes, reproducibility -----------------------------------------------


NO_DROP = {"task_arithmetic": {}, "magnitude": {"density": 1.0}, "dare_linear": {"drop_rate": 0.0},
           "ties": {"density": 1.0}, "dare_ties": {"drop_rate": 0.0}, "della": {"density": 1.0, "epsilon": 0.0}}


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
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


def test_dare_keeps_exactly_the_words_at_or_above_the_threshold():
    delta = torch.ones(5000)
    words = EntryRandoms(4, "w", 2).words(5000)
    u = EntryRandoms(4, "w", 2).uniform_like(delta)
    for p in (0.0, 0.3, 0.7, 0.9, 1 - 2**-40):
        keep = random_keep_mask(delta, p, EntryRandoms(4, "w", 2))
        assert torch.equal(keep, torch.from_numpy(words >= keep_threshold(p)))
        assert torch.equal(keep, u >= p)  # the same test on u = w / 2^32 (float64, exact)
    assert keep_threshold(0.0) == 0 and keep_threshold(0.5) == 2**31 and keep_threshold(1 - 2**-40) == 2**32
    assert not random_keep_mask(delta, 1 - 2**-40, EntryRandoms(4, "w", 2)).any()


def test_keep_mask_from_high_halves_equals_the_full_word_test_at_ties():
    # the fast mask reads lo only where hi equals the threshold's top byte; thresholds built from
    # actual words make such ties certain (and every threshold ties about one entry in 256)
    n = BLOCK + 5000  # two blocks, the second partial
    words = EntryRandoms(3, "t", 1, offset=BLOCK - 2000).words(n).astype(np.int64)
    for j in (0, 1999, 2000, 2001, n - 1):
        for thr in (words[j] - 1, words[j], words[j] + 1, words[j] & ~0xFFFFFF, 3 * 2**30 + 5):
            p = thr / 2**32
            assert keep_threshold(p) == thr
            keep = EntryRandoms(3, "t", 1, offset=BLOCK - 2000).keep_mask(n, p)
            assert np.array_equal(keep, words >= thr), (j, thr)
    hi_ties = (words >> 24) == (words[7] >> 24)
    assert hi_ties.sum() >= 1


def test_chunks_see_the_same_random_mask_as_the_whole_tensor():
    base = torch.randn(300, 7)
    experts = [base + torch.randn(300, 7), base - torch.randn(300, 7)]
    whole = merge_tensor("w", base, experts, "dare_ties", drop_rate=0.6, seed=1)
    top = merge_tensor("w", base[:120], [e[:120] for e in experts], "dare_ties", drop_rate=0.6, seed=1)
    rest = merge_tensor("w", base[120:], [e[120:] for e in experts], "dare_ties", drop_rate=0.6, seed=1, offset=120 * 7)
    assert torch.equal(torch.cat([top, rest]), whole)


def test_block_randoms_are_chunk_invariant_and_seeds_stable():
    x = torch.zeros(2 * BLOCK + 3)
    whole = EntryRandoms(0, "a", 1).uniform_like(x)
    chunk = EntryRandoms(0, "a", 1, offset=BLOCK - 5).uniform_like(torch.zeros(BLOCK + 7))
    assert torch.equal(whole[BLOCK - 5:2 * BLOCK + 2], chunk)
    # fewer words are a prefix of the full block (odd counts too: rng relies on it)
    full = block_words(0, "a", 0, 0)
    for m in (1, 17, 1000, 65_537):
        assert np.array_equal(block_words(0, "a", 0, 0, m), full[:m])
    assert torch.equal(whole[:BLOCK], torch.from_numpy(block_words(0, "a", 1, 0) * 2.0**-32))
    assert derive_seed(0, "a", 0) == derive_seed(0, "a", 0) != derive_seed(0, "a", 1)
    # the words themselves, rebuilt from their definition with plain Python integers: hi = the bytes
    # of PCG64(key).random_raw(), lowest first; lo = the top 24 bits of SplitMix64's output
    # function at key + (i + 1) · gamma
    key = derive_seed(0, "a", 0, 0)
    raw = int(np.random.PCG64(key).random_raw())
    mask = 2**64 - 1

    def splitmix_top24(i):
        x = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return (x ^ (x >> 31)) >> 40

    expected = [((raw >> (8 * i)) & 0xFF) << 24 | splitmix_top24(i) for i in range(8)]
    assert block_words(0, "a", 0, 0, 8).tolist() == expected
    assert derive_seed(0, "encoder.layer.0.attention.self.query.weight", 0) == 4869231532230289971  # hashlib: stable across runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_identical_on_cpu_and_cuda():
    base = torch.randn(64, 64)
    experts = [base + torch.randn(64, 64), base + torch.randn(64, 64)]
    cpu = merge_tensor("w", base, experts, "dare_ties", drop_rate=0.5)
    cuda = merge_tensor("w", base.cuda(), [e.cuda() for e in experts], "dare_ties", drop_rate=0.5)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu)


def test_magnitude_chunks_with_the_tensor_threshold_match_the_whole_tensor():
    base = torch.randn(200, 9)
    experts = [base + torch.randn(200, 9), base - torch.randn(200, 9)]
    whole = merge_tensor("w", base, experts, "ties", density=0.3)
    thresholds = [kth_largest_abs(e - base, round(0.3 * base.numel())) for e in experts]
    chunks = [merge_tensor("w", base[r], [e[r] for e in experts], "ties", density=0.3, thresholds=thresholds)
              for r in (slice(0, 77), slice(77, 200))]
    assert torch.equal(torch.cat(chunks), whole)


def test_rescale_factor_per_partition():
    base = bert_like()
    expert = expert_of(base, 1)
    factors = {"layer.0.ffn": 2.0}  # other partitions default to 1
    merged = merge_state_dicts(base, [expert], "magnitude", density=1.0, rescale="factor", rescale_factor=factors,
                               progress=False)
    for name in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.intermediate.dense.weight"):
        factor = 2.0 if "layer.0" in name else 1.0
        torch.testing.assert_close(merged[name], base[name] + factor * (expert[name] - base[name]))


def test_masks_in_a_forked_child_after_the_parent_drew_some():
    # the parent's block thread pool does not survive fork(); the child must make its own
    import multiprocessing

    n = 3 * BLOCK  # several blocks: drawn on the thread pool
    parent = EntryRandoms(1, "w", 0).keep_mask(n, 0.7)
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_mask_sum, args=(queue, n))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=5) == int(parent.sum())


def _child_mask_sum(queue, n):
    queue.put(int(EntryRandoms(1, "w", 0).keep_mask(n, 0.7).sum()))
