"""Introduced in chapter 7: LoRA experts as delta parameters.

A LoRA expert leaves the base's weight W of a target map frozen and learns two small
factors, A (r × d_in) and B (d_out × r); the fine-tuned map is W + ΔW with

    ΔW = (α / r) · B A        (rank ≤ r, α = ``lora_alpha``)

To merge LoRA experts with the book's methods we *materialise* ΔW per matrix: then
they are ordinary (low-rank) deltas, zero outside the target maps. This module reads
a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``: JSON
and safetensors, nothing unpickled), checks that the experts agree on targets and
rank, and computes ΔW; a test checks ΔW against peft's ``merge_and_unload`` weights
minus the base.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .drop import random_keep_mask
from .rng import EntryRandoms

PREFIX = "base_model.model."  # peft's prefix of the wrapped model's parameter names


@dataclass(frozen=True)
class Adapter:
    """One LoRA expert (chapter 7): rank r, α, target maps, and per base weight its factors (A, B)."""

    path: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # base weight name → (A, B)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def read_adapter(folder) -> Adapter:
    """A peft LoRA adapter folder, read without unpickling (chapter 7)."""
    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"read_adapter: {f} not found (a peft LoRA adapter folder has "
                                    "adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"read_adapter: {folder} is a {config.get('peft_type')!r} adapter, not LoRA")
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"read_adapter: {folder} uses rsLoRA or DoRA, whose ΔW is not (α/r)·BA")
    tensors = load_file(str(weights_file))
    factors = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix(PREFIX).split(".lora_A.")[0]
            factors[f"{module}.weight"] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    targets = config["target_modules"]
    targets = tuple(sorted(targets if isinstance(targets, list) else [targets]))
    return Adapter(folder, int(config["r"]), float(config["lora_alpha"]), targets, factors)


def check_same_shape(adapters: Mapping[str, Adapter]) -> None:
    """Every expert has the same target maps and rank, else a ValueError naming them (chapter 7)."""
    items = list(adapters.items())
    first_name, first = items[0]
    for name, ad in items[1:]:
        if ad.targets != first.targets or set(ad.factors) != set(first.factors):
            raise ValueError(f"LoRA experts {first_name!r} and {name!r} adapt different maps: "
                             f"{list(first.targets)} vs {list(ad.targets)}")
        if ad.rank != first.rank:
            raise ValueError(f"LoRA experts {first_name!r} and {name!r} have different ranks: "
                             f"{first.rank} vs {ad.rank}")


def lora_delta(adapter: Adapter, name: str) -> torch.Tensor:
    """ΔW = (α/r) · B A of the base weight ``name`` (chapter 7)."""
    a, b = adapter.factors[name]
    return adapter.scale * (b.float() @ a.float())


def lora_deltas(adapters: Mapping[str, Adapter]) -> dict[str, dict[str, torch.Tensor]]:
    """expert → {base weight name → ΔW} for experts that adapt the same maps at the same rank (chapter 7)."""
    check_same_shape(adapters)
    return {t: {n: lora_delta(ad, n) for n in ad.factors} for t, ad in adapters.items()}


def with_deltas(base: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ_b + ΔW on the adapted weights, θ_b elsewhere: a LoRA expert as a state dict (chapter 7)."""
    unknown = sorted(set(deltas) - set(base))
    if unknown:
        raise KeyError(f"with_deltas: {unknown[:3]} are not weights of the base")
    return {n: (w + deltas[n].to(w.dtype) if n in deltas else w) for n, w in base.items()}


def dare_on_factors(adapter: Adapter, name: str, drop_rate: float, seed: int = 0) -> torch.Tensor:
    """DARE applied to the factors instead of ΔW (chapter 7): drop entries of A and of B at
    ``drop_rate``, rescale each by 1/(1 − p), and multiply. Every entry of ΔW is a sum of r
    products, so dropping a factor entry removes a whole row or column's share of ΔW."""
    a, b = adapter.factors[name]
    keep = 1.0 - drop_rate
    a2 = a.float() * random_keep_mask(a.float(), drop_rate, EntryRandoms(seed, f"{name}.lora_A", 0)) / keep
    b2 = b.float() * random_keep_mask(b.float(), drop_rate, EntryRandoms(seed, f"{name}.lora_B", 0)) / keep
    return adapter.scale * (b2 @ a2)


def low_rank_check(deltas: Sequence[torch.Tensor]) -> list[int]:
    """The numerical rank of each ΔW (chapter 7): ≤ r for a LoRA delta; DARE on ΔW makes it full."""
    return [int(torch.linalg.matrix_rank(d.float())) for d in deltas]
