"""Reproducible randomness for random drop masks (DARE, DELLA).

Introduced in chapter 2: a DARE mask must not depend on the order in which tensors
are processed (streaming merges visit them in file order, in-memory merges in dict
order), on how a tensor is cut into chunks, on the number of threads, nor on the
device. So every entry gets its own 32-bit random word, addressed by
(seed, tensor name, expert index, flat position):

* the flattened tensor is cut into blocks of ``BLOCK`` entries; every
  (seed, tensor, expert, block) gets a 63-bit key from a stable hash (hashlib, not
  Python's per-process salted ``hash``);
* the word of the entry at position i of its block is ``w = hi · 2^24 + lo``:

  - ``hi`` is the i-th byte of the block's stream ``PCG64(key).random_raw`` (each
    64-bit output read as eight bytes, lowest first: :func:`high_words`);
  - ``lo`` is a 24-bit counter-based hash of (key, i), the top bits of SplitMix64's
    output function (:func:`low_words`), computed for any set of positions directly;

* the uniform number of an entry is u = w / 2^32, exact in float64 (32 random bits;
  ``torch.rand`` gives float32 with 24). DARE keeps an entry when u >= p, i.e. when
  w >= ceil(p · 2^32) (:func:`keep_threshold`, an integer comparison): probability
  1 − ceil(p · 2^32) / 2^32, within 2^-32 of 1 − p. DELLA keeps it when u < q_i.

Why two parts: the keep test ``w >= t`` is decided by ``hi`` alone unless ``hi``
equals the top byte of t, which happens for one entry in 256. So a DARE mask
(:func:`keep_from_high`) draws 8 bits per entry from the fast sequential generator
and hashes ``lo`` only at those few positions: about 0.3 ns per entry on our CPU,
against about 1.2 ns for a full 32-bit word per entry (numpy's generator costs
~1.6 ns per 64-bit output, whatever we use of it). The mask is exactly the one the
full words give (tests compare them).

Words are drawn on the CPU; masks are moved to the device afterwards, so a CUDA merge
gets the same masks as a CPU one. Large masks are drawn block by block on a few
threads (numpy releases the GIL while it fills and compares arrays).
"""
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

BLOCK = 1 << 20
_LOW_BITS = 24  # w = hi · 2^24 + lo


def derive_seed(seed: int, tensor_name: str, expert_index: int, block: int = 0) -> int:
    """A 63-bit key that depends only on its arguments (chapter 2)."""
    text = f"{int(seed)}|{tensor_name}|{int(expert_index)}|{int(block)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def high_words(key: int, n: int = BLOCK) -> np.ndarray:
    """The high bytes of the first ``n`` (<= BLOCK) words of a block, as uint8: byte
    i % 8 (lowest first) of the (i // 8)-th output of ``PCG64(key).random_raw`` (chapter 2)."""
    raw = np.random.PCG64(key).random_raw((n + 7) // 8).astype("<u8", copy=False)
    return raw.view(np.uint8)[:n]


_SM_GAMMA, _SM_M1, _SM_M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def low_words(key: int, positions) -> np.ndarray:
    """The low 24 bits of the words at in-block ``positions``: the top 24 bits of
    SplitMix64's output function applied to key + (i + 1) · golden gamma (mod 2^64) (chapter 2).
    ``key`` may be an array (one key per position)."""
    i = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(key) + (i + np.uint64(1)) * _SM_GAMMA
        x = (x ^ (x >> np.uint64(30))) * _SM_M1
        x = (x ^ (x >> np.uint64(27))) * _SM_M2
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(64 - _LOW_BITS)).astype(np.uint32)


def block_words(seed: int, tensor_name: str, expert_index: int, block: int, n: int = BLOCK) -> np.ndarray:
    """The first ``n`` (<= BLOCK) 32-bit words of one block, hi · 2^24 + lo, as uint32 (chapter 2)."""
    key = derive_seed(seed, tensor_name, expert_index, block)
    hi = high_words(key, n).astype(np.uint32)
    return (hi << np.uint32(_LOW_BITS)) | low_words(key, np.arange(n))


def keep_threshold(drop_rate: float) -> int:
    """DARE keeps an entry when its word w >= ceil(p · 2^32), i.e. when u = w / 2^32 >= p
    (p · 2^32 is exact in float64, so the two readings agree for every word) (chapter 2)."""
    return math.ceil(float(drop_rate) * 2**32)


def keep_from_high(hi: np.ndarray, threshold: int, low_of, out: np.ndarray | None = None) -> np.ndarray:
    """``w >= threshold`` for the words w = hi · 2^24 + lo, looking at ``lo`` only where
    ``hi`` equals the threshold's top byte; ``low_of(indices into hi)`` returns those lo (chapter 2).
    ``out`` (bool or float, same length) receives 1/0; returns it."""
    t_hi, t_lo = divmod(int(threshold), 1 << _LOW_BITS)
    if out is None:
        out = np.empty(hi.shape, dtype=bool)
    if t_hi >= 256:  # threshold 2^32: no word reaches it
        out[...] = 0
    elif t_lo == 0:
        np.greater_equal(hi, t_hi, out=out, casting="unsafe")
    else:
        np.greater(hi, t_hi, out=out, casting="unsafe")
        ties = np.flatnonzero(hi == t_hi)
        if ties.size:
            out[ties] = low_of(ties) >= t_lo
    return out


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads: it makes its own pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _map(fn, items):
    """``map`` over blocks, on a few threads when there is more than one block."""
    global _POOL
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="rng")
    return list(_POOL.map(fn, items))


class EntryRandoms:
    """Random words addressed by entry: those of (seed, tensor, expert), starting at
    flat entry ``offset`` (nonzero when merging a chunk of a larger tensor) (chapter 2)."""

    def __init__(self, seed: int, tensor_name: str, expert_index: int, offset: int = 0):
        self.seed, self.tensor_name, self.expert_index, self.offset = seed, tensor_name, expert_index, offset

    def _spans(self, n: int):
        """(block, first, last) in-block ranges covering entries offset ... offset + n − 1."""
        start, stop = self.offset, self.offset + n
        for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            yield block, max(0, start - block * BLOCK), min(BLOCK, stop - block * BLOCK)

    def _key(self, block: int) -> int:
        return derive_seed(self.seed, self.tensor_name, self.expert_index, block)

    def words(self, n: int) -> np.ndarray:
        """uint32 words of entries offset, ..., offset + n − 1."""
        if n == 0:
            return np.empty(0, dtype=np.uint32)
        parts = _map(lambda s: block_words(self.seed, self.tensor_name, self.expert_index, s[0], s[2])[s[1]:],
                     self._spans(n))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def keep_mask(self, n: int, drop_rate: float) -> np.ndarray:
        """Boolean DARE mask of entries offset, ..., offset + n − 1: ``words(n) >=
        keep_threshold(drop_rate)``, computed from the high bytes (:func:`keep_from_high`)."""
        threshold = keep_threshold(drop_rate)
        out = np.empty(n, dtype=bool)

        def fill(span):
            block, first, last = span
            key, at = self._key(block), block * BLOCK - self.offset  # out index of in-block position 0
            keep_from_high(high_words(key, last)[first:], threshold, lambda idx: low_words(key, idx + first),
                           out=out[at + first:at + last])

        _map(fill, self._spans(n) if n else [])
        return out

    def keep_mask_per_entry(self, drop_rates: np.ndarray) -> np.ndarray:
        """Boolean DARE mask with one drop rate per entry (float64 array of length n):
        ``words(n) >= ceil(p_i · 2^32)``, the test of :meth:`keep_mask` entry by entry."""
        thresholds = np.ceil(np.asarray(drop_rates, dtype=np.float64) * 2.0**32)
        return self.words(len(thresholds)) >= thresholds

    def uniform_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """u = w / 2^32 (float64, exact, in [0, 1)) of ``tensor``'s shape on its device."""
        u = torch.from_numpy(self.words(tensor.numel()) * 2.0**-32)
        return u.reshape(tensor.shape).to(tensor.device)


def uniform_like(tensor: torch.Tensor, generator) -> torch.Tensor:
    """Uniform [0, 1) numbers of ``tensor``'s shape on its device, from an
    :class:`EntryRandoms` (float64, the package's masks) or a CPU ``torch.Generator``
    (float32 ``torch.rand``, drawn in sequence: a valid mask, not the package's) (chapter 2)."""
    if isinstance(generator, EntryRandoms):
        return generator.uniform_like(tensor)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"uniform_like: expected a CPU torch.Generator or EntryRandoms, got {generator!r}")
    return torch.rand(tensor.shape, generator=generator).to(tensor.device)
