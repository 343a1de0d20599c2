"""Reproducible randomness for random drop masks (DARE, DELLA).

Introduced in chapter 2: a DARE mask must not depend on the order in which tensors
are processed (streaming merges visit them in file order, in-memory merges in dict
order), nor on the device. So every (seed, tensor name, expert index) gets its own
generator, seeded from a stable hash (hashlib, not Python's salted ``hash``), and
the random numbers are always drawn on the CPU and then moved to the device.

Cost of drawing on the CPU: about 4 bytes per entry copied to the GPU (a 45M-entry
tensor: 180 MB, a few ms over PCIe) plus the CPU time of ``torch.rand`` (roughly
0.1–0.2 s per 45M entries on one core). CUDA's generator would be faster but gives
different numbers than the CPU's, so masks would change with the device.
"""
import hashlib

import torch


def derive_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit seed that depends only on (seed, tensor_name, expert_index)."""
    text = f"{int(seed)}|{tensor_name}|{int(expert_index)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def generator_for(seed: int, tensor_name: str, expert_index: int, device=None) -> torch.Generator:
    """A CPU generator for one expert's tensor. ``device`` is accepted for symmetry
    but ignored on purpose: draw with :func:`uniform_like`, which moves to the device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, tensor_name, expert_index))
    return generator


def uniform_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers of ``tensor``'s shape, drawn on the CPU with
    ``generator`` and returned on ``tensor``'s device (identical on CPU and CUDA)."""
    u = torch.rand(tensor.shape, generator=generator, dtype=torch.float32, device="cpu")
    return u.to(tensor.device)
