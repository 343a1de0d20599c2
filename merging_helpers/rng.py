"""Reproducible randomness for random drop masks (DARE, DELLA).

Introduced in chapter 2: a DARE mask must not depend on the order in which tensors
are processed (streaming merges visit them in file order, in-memory merges in dict
order), on how a tensor is cut into chunks, nor on the device. So:

* every (seed, tensor name, expert index, block) gets its own generator, seeded from
  a stable hash (hashlib, not Python's per-process salted ``hash``);
* the flattened tensor is cut into blocks of ``BLOCK`` entries, and entry i always
  gets the (i mod BLOCK)-th number of its block's stream. A chunk starting at flat
  ``offset`` therefore sees the same numbers as the whole tensor;
* numbers are drawn on the CPU, then moved to the device. Cost: 4 bytes per entry
  copied to the GPU (45M entries: 180 MB, a few ms) plus ``torch.rand`` on the CPU
  (measured 0.12 s per 45M entries). CUDA's generator would be faster but gives
  other numbers than the CPU's, so masks would change with the device.
"""
import hashlib

import torch

BLOCK = 1 << 20


def derive_seed(seed: int, tensor_name: str, expert_index: int, block: int = 0) -> int:
    """A 63-bit seed that depends only on its arguments."""
    text = f"{int(seed)}|{tensor_name}|{int(expert_index)}|{int(block)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def generator_for(seed: int, tensor_name: str, expert_index: int, device=None, block: int = 0) -> torch.Generator:
    """A CPU generator for one block of one expert's tensor. ``device`` is ignored on
    purpose: numbers are drawn on the CPU and moved (see the module docstring)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, tensor_name, expert_index, block))


class EntryRandoms:
    """Uniform numbers addressed by entry: those of (seed, tensor, expert), starting
    at flat entry ``offset`` (nonzero when merging a chunk of a larger tensor)."""

    def __init__(self, seed: int, tensor_name: str, expert_index: int, offset: int = 0):
        self.seed, self.tensor_name, self.expert_index, self.offset = seed, tensor_name, expert_index, offset

    def uniform_like(self, tensor: torch.Tensor) -> torch.Tensor:
        start, stop = self.offset, self.offset + tensor.numel()
        if start == stop:
            return torch.empty(tensor.shape, device=tensor.device)
        parts = []
        for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            generator = generator_for(self.seed, self.tensor_name, self.expert_index, block=block)
            # torch.rand(m) is a prefix of torch.rand(BLOCK) on the CPU (pinned by a test),
            # so drawing only up to the last needed entry keeps small tensors cheap.
            numbers = torch.rand(min(BLOCK, stop - block * BLOCK), generator=generator)
            parts.append(numbers[max(0, start - block * BLOCK):])
        return torch.cat(parts).reshape(tensor.shape).to(tensor.device)


def uniform_like(tensor: torch.Tensor, generator) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers of ``tensor``'s shape on its device, from a CPU
    ``torch.Generator`` (drawn in sequence) or an :class:`EntryRandoms`."""
    if isinstance(generator, EntryRandoms):
        return generator.uniform_like(tensor)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"uniform_like: expected a CPU torch.Generator or EntryRandoms, got {generator!r}")
    return torch.rand(tensor.shape, generator=generator).to(tensor.device)
