"""Reproducible DARE words: the threshold rule, chunk/order/fork/device independence (merging_helpers.rng, chapter 2)."""
import numpy as np
import pytest
import torch

from merging_helpers.drop import random_keep_mask
from merging_helpers.recipes import merge_tensor
from merging_helpers.rng import BLOCK, EntryRandoms, block_words, derive_seed, keep_threshold


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
