"""Reproducible randomness for random drop masks (DARE, DELLA).

Introduced in chapter 2: a DARE mask must not depend on the order in which tensors
are processed (streaming merges visit them in file order, in-memory merges in dict
order), on how a tensor is cut into chunks, on the number of threads, nor on the
device. So:

* the flattened tensor is cut into blocks of ``BLOCK`` entries; every (seed, tensor
  name, expert index, block) gets its own generator, numpy's PCG64, seeded from a
  stable hash (hashlib, not Python's per-process salted ``hash``);
* a block's stream is ``PCG64(seed).random_raw(BLOCK / 2)``: 64-bit words, each read
  as two 32-bit words, low half first. Entry i gets the (i mod BLOCK)-th 32-bit word w
  of its block, so a chunk starting at flat ``offset`` sees the same words as the
  whole tensor;
* the uniform number of an entry is u = w / 2^32, exact in float64 (32 random bits;
  ``torch.rand`` gives float32 with 24). DARE keeps an entry when u >= p, i.e. when
  w >= ceil(p · 2^32) (:func:`keep_threshold`, an integer comparison): probability
  1 − ceil(p · 2^32) / 2^32, within 2^-32 of 1 − p. DELLA keeps it when u < q_i;
* words are drawn on the CPU; masks are moved to the device afterwards, so a CUDA
  merge gets the same masks as a CPU one.

Cost, measured on our 2-core CPU (busy, 45M entries): PCG64 ``random_raw`` ~1.1 ns per
entry, against ~3.9 ns for ``torch.rand`` (mt19937, one 32-bit draw per float), which
this module used before; the fused streaming path draws blocks on its worker threads
(numpy releases the GIL while it fills the array).
"""
import hashlib
import math

import numpy as np
import torch

BLOCK = 1 << 20


def derive_seed(seed: int, tensor_name: str, expert_index: int, block: int = 0) -> int:
    """A 63-bit seed that depends only on its arguments."""
    text = f"{int(seed)}|{tensor_name}|{int(expert_index)}|{int(block)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def block_words(seed: int, tensor_name: str, expert_index: int, block: int, n: int = BLOCK) -> np.ndarray:
    """The first ``n`` (<= BLOCK) 32-bit words of one block's stream, as a uint32 array.
    Drawing fewer words gives a prefix of the full block (PCG64 is sequential)."""
    bits = np.random.PCG64(derive_seed(seed, tensor_name, expert_index, block))
    raw = bits.random_raw((n + 1) // 2).astype("<u8", copy=False)  # little-endian: low half first
    return raw.view("<u4")[:n]


def keep_threshold(drop_rate: float) -> int:
    """DARE keeps an entry when its word w >= ceil(p · 2^32), i.e. when u = w / 2^32 >= p
    (p · 2^32 is exact in float64, so the two readings agree for every word)."""
    return math.ceil(float(drop_rate) * 2**32)


class EntryRandoms:
    """Random words addressed by entry: those of (seed, tensor, expert), starting at
    flat entry ``offset`` (nonzero when merging a chunk of a larger tensor)."""

    def __init__(self, seed: int, tensor_name: str, expert_index: int, offset: int = 0):
        self.seed, self.tensor_name, self.expert_index, self.offset = seed, tensor_name, expert_index, offset

    def words(self, n: int) -> np.ndarray:
        """uint32 words of entries offset, ..., offset + n − 1."""
        start, stop = self.offset, self.offset + n
        if n == 0:
            return np.empty(0, dtype=np.uint32)
        parts = []
        for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            words = block_words(self.seed, self.tensor_name, self.expert_index, block, min(BLOCK, stop - block * BLOCK))
            parts.append(words[max(0, start - block * BLOCK):])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def uniform_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """u = w / 2^32 (float64, exact, in [0, 1)) of ``tensor``'s shape on its device."""
        u = torch.from_numpy(self.words(tensor.numel()) * 2.0**-32)
        return u.reshape(tensor.shape).to(tensor.device)


def uniform_like(tensor: torch.Tensor, generator) -> torch.Tensor:
    """Uniform [0, 1) numbers of ``tensor``'s shape on its device, from an
    :class:`EntryRandoms` (float64, the package's masks) or a CPU ``torch.Generator``
    (float32 ``torch.rand``, drawn in sequence: a valid mask, not the package's)."""
    if isinstance(generator, EntryRandoms):
        return generator.uniform_like(tensor)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"uniform_like: expected a CPU torch.Generator or EntryRandoms, got {generator!r}")
    return torch.rand(tensor.shape, generator=generator).to(tensor.device)
