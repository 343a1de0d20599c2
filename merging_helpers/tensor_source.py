"""Where a plan reads the model from: state dicts in memory, or checkpoint folders on disk.

Introduced in chapter 3 (the engine), used from chapter 4 on. A method whose config depends on statistics of the
whole model (a *plan*: RMS-adaptive's RMS table, DP's significances, APL's partitions;
:func:`merging_helpers.methods.get_plan`) reads the model through this one small
interface, so the same plan runs in memory (:func:`~merging_helpers.recipes.merge_state_dicts`)
and streamed from disk (:func:`~merging_helpers.fast.streaming.merge_folders`) and gives
the same config, bit for bit.

A source has ``expert_names``, ``shapes`` (the floating tensors' shapes, in the model's
order) and ``triples(names)``: ``(name, base tensor, [expert tensors])`` for the given
names, in that order. A plan may call ``triples`` more than once (a statistic that needs
a mean first reads twice); it must not keep the tensors it is handed (a streamed source
reuses their memory).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch


class TensorSource(Protocol):
    """What a plan reads: the floating tensors' shapes, and the tensors themselves on request (chapter 3)."""

    expert_names: list[str]
    shapes: dict[str, tuple]

    def triples(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        ...


class StateDictSource:
    """A :class:`TensorSource` over a base state dict and the experts' state dicts, in memory (chapter 3)."""

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 expert_names: Sequence[str]):
        self.base, self.experts, self.expert_names = base, list(experts), list(expert_names)
        self.shapes = {n: tuple(t.shape) for n, t in base.items() if t.is_floating_point()}

    def triples(self, names):
        for name in names:
            yield name, self.base[name], [e[name] for e in self.experts]
