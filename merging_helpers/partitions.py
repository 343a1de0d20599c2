"""Parameter names → layer, role and linear type.

Introduced in chapter 1: every method of the book groups delta parameters into
*partitions* (the whole model, one layer, the attention of one layer, one linear
map...) and often gives each partition its own drop rate. This module turns a
parameter name into a partition key, for BERT-style and Llama-style checkpoints.

Roles: ``attention``, ``ffn``, ``embedding``, ``norm``, ``head`` (the pooler,
classifier, ``lm_head`` and MLM head count as head), ``other`` (unknown names).
Linear types: ``q k v o`` (attention) and ``up gate down`` (FFN). A bias belongs to
the linear map it is added in (``query.bias`` is part of ``q``).

Rates (drop rates, densities, rescale factors) can be given at any granularity: one
float, a ``{partition key: rate}`` mapping, and, inside a mapping, a vector of one
rate per row (:class:`PerRow`) or per column (:class:`PerColumn`) of the tensors of
that partition (APL's hidden-state level, DPPA's bands).
"""
import math
import numbers
import re
from collections import defaultdict
from typing import NamedTuple

import torch

LEVELS = ("model", "layer", "role", "linear", "layer_role", "layer_linear", "tensor")


class ParamInfo(NamedTuple):
    """Layer, role and linear type of one parameter name (chapter 1)."""

    layer: int | None  # transformer block index, None outside the blocks
    role: str
    linear: str | None  # q, k, v, o, up, gate, down; None for non-linear params


_LAYER = re.compile(r"(?:^|\.)(?:encoder\.layer|layers|h|blocks)\.(\d+)\.")

# (pattern searched in the name, role, linear); the first match wins, so heads and
# LayerNorms come before the generic "output.dense" rules.
_RULES = [
    (r"(?:^|\.)(pooler|classifier|cls|lm_head|score)\.", "head", None),
    (r"LayerNorm|layernorm|layer_norm|(?:^|\.)norm\.", "norm", None),
    (r"(?:^|\.)embeddings?\.|embed_tokens", "embedding", None),
    (r"attention\.self\.query\.|self_attn\.q_proj\.", "attention", "q"),
    (r"attention\.self\.key\.|self_attn\.k_proj\.", "attention", "k"),
    (r"attention\.self\.value\.|self_attn\.v_proj\.", "attention", "v"),
    (r"attention\.output\.dense\.|self_attn\.o_proj\.", "attention", "o"),
    (r"intermediate\.dense\.|mlp\.up_proj\.", "ffn", "up"),
    (r"mlp\.gate_proj\.", "ffn", "gate"),
    (r"(?:^|\.)output\.dense\.|mlp\.down_proj\.", "ffn", "down"),
]
_RULES = [(re.compile(pattern), role, linear) for pattern, role, linear in _RULES]


def describe(name: str, strict: bool = False) -> ParamInfo:
    """Layer index, role and linear type of a parameter name (chapter 1).

    Unknown names fall back to role ``"other"`` (and linear ``None``); with
    ``strict=True`` they raise a ValueError instead.
    """
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    for pattern, role, linear in _RULES:
        if pattern.search(name):
            return ParamInfo(layer, role, linear)
    if strict:
        raise ValueError(f"describe: unknown parameter name {name!r} (not a BERT- or Llama-style name)")
    return ParamInfo(layer, "other", None)


def partition_key(name: str, level: str = "tensor", strict: bool = False) -> str:
    """The partition a parameter belongs to at ``level`` (one of ``LEVELS``) (chapter 1).

    Keys are plain strings: ``"model"``, ``"layer.3"``, ``"attention"``, ``"q"``,
    ``"layer.3.attention"``, ``"layer.3.q"`` or the name itself. Parameters outside
    the transformer blocks (embeddings, final norm, head) use their role as key at
    the layer levels, and non-linear parameters use their role at the linear levels.
    """
    if level not in LEVELS:
        raise ValueError(f"partition_key: level must be one of {LEVELS}, got {level!r}")
    if level == "model":
        return "model"
    if level == "tensor":
        return name
    info = describe(name, strict=strict)
    what = info.role if level.endswith("role") else (info.linear or info.role)
    if level in ("role", "linear"):
        return what
    if level == "layer":
        return info.role if info.layer is None else f"layer.{info.layer}"
    return what if info.layer is None else f"layer.{info.layer}.{what}"


def group_by(names, level: str = "layer") -> dict[str, list[str]]:
    """Partition ``names`` into ``{key: [names...]}``; every name lands in exactly one group (chapter 1)."""
    groups = defaultdict(list)
    for name in names:
        groups[partition_key(name, level)].append(name)
    return dict(groups)


class PerRow(NamedTuple):
    """One rate per row (dim 0) of a tensor: ``PerRow(torch.tensor([...]))`` (chapter 4)."""

    values: torch.Tensor


class PerColumn(NamedTuple):
    """One rate per column (dim 1) of a 2-D tensor (chapter 4)."""

    values: torch.Tensor


class Floored(float):
    """A density whose magnitude trim keeps int(d · n) entries (rounded down, as mergekit and peft
    do) where a plain float keeps round(d · n); ``MergeConfig(count_rounding="floor")`` makes them
    (chapter 8's appendix)."""


RATE_RANGES = {"drop_rate": (0.0, 1.0, "[0, 1)"), "density": (0.0, 1.0, "(0, 1]"), "factor": (0.0, math.inf, "[0, inf)")}


def _in_range(values: torch.Tensor, what: str) -> torch.Tensor:
    lo, hi, _ = RATE_RANGES[what]
    if what == "drop_rate":
        return (values >= lo) & (values < hi)
    if what == "density":
        return (values > lo) & (values <= hi)
    return (values >= lo) & (values < hi)


def validate_rates(rates, what: str = "drop_rate") -> None:
    """Check a float, ``{partition key: rate}`` or :class:`PerRow`/:class:`PerColumn`
    of drop rates, densities or rescale factors (chapter 2).

    Drop rates must lie in [0, 1) (p = 1 would divide by zero in DARE), densities in
    (0, 1], factors in [0, inf); every value must be a finite number. The error names the bad key.
    """
    if what not in RATE_RANGES:
        raise ValueError(f"validate_rates: what must be one of {tuple(RATE_RANGES)}, got {what!r}")
    items = rates.items() if isinstance(rates, dict) else [(None, rates)]
    for key, rate in items:
        where = f"{what}" if key is None else f"{what}[{key!r}]"
        if isinstance(rate, (PerRow, PerColumn)):
            values = rate.values
            if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.is_floating_point():
                raise TypeError(f"{where}: {type(rate).__name__} needs a 1-D float tensor, got {values!r}")
            bad = ~(torch.isfinite(values) & _in_range(values.double(), what))
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(f"{where}: entry {i} = {float(values[i])} is outside the allowed range "
                                 f"{RATE_RANGES[what][2]}")
            continue
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(f"{where} must be a float, got {type(rate).__name__}")
        if not (math.isfinite(rate) and bool(_in_range(torch.tensor(float(rate), dtype=torch.float64), what))):
            raise ValueError(f"{where} = {rate} is outside the allowed range {RATE_RANGES[what][2]}")


def rate_for(name: str, rates, level: str = "layer_role", default: float | None = None):
    """The rate of parameter ``name`` (chapter 2): ``rates`` itself if it is not a dict,
    else ``rates[partition_key(name, level)]`` (or ``default`` when the key is missing).
    A float, or the :class:`PerRow`/:class:`PerColumn` vector given for that partition.

    This is how per-partition drop rates (APL, DPPA, RMS-adaptive) reach the engine.
    """
    if not isinstance(rates, dict):
        return rates if isinstance(rates, (PerRow, PerColumn)) else float(rates)
    key = partition_key(name, level)
    if key in rates:
        rate = rates[key]
        return rate if isinstance(rate, (PerRow, PerColumn)) else float(rate)
    if default is None:
        raise KeyError(f"rate_for: no rate for partition {key!r} of {name!r} (level {level!r}) and no default")
    return float(default)


def check_rate_fits(name: str, shape, rate, what: str) -> None:
    """A :class:`PerRow`/:class:`PerColumn` rate must have one value per row/column of tensor ``name`` (chapter 1)."""
    if isinstance(rate, PerRow):
        want, axis = (shape[0] if len(shape) >= 1 else None), "rows"
    elif isinstance(rate, PerColumn):
        want, axis = (shape[1] if len(shape) >= 2 else None), "columns"
    else:
        return
    if want is None:
        raise ValueError(f"{what}: a {type(rate).__name__} rate for {name!r}, a tensor of shape {tuple(shape)} "
                         f"without {axis}")
    if rate.values.numel() != want:
        raise ValueError(f"{what}: {type(rate).__name__} for {name!r} has {rate.values.numel()} values, the tensor "
                         f"has {want} {axis} (shape {tuple(shape)})")


def broadcast_rate(rate, shape, device=None):
    """A float stays a float; a :class:`PerRow`/:class:`PerColumn` becomes a float64
    tensor that broadcasts against a tensor of ``shape`` (chapter 4)."""
    if isinstance(rate, PerRow):
        return rate.values.double().to(device).reshape((-1,) + (1,) * (len(shape) - 1))
    if isinstance(rate, PerColumn):
        return rate.values.double().to(device).reshape((1, -1) + (1,) * (len(shape) - 2))
    return rate


def complement(rate):
    """1 − rate, for a float or a :class:`PerRow`/:class:`PerColumn` (drop rate ↔ density, chapter 2)."""
    if isinstance(rate, (PerRow, PerColumn)):
        return type(rate)(1.0 - rate.values.double())
    return 1.0 - rate


def unused_rate_keys(names, rates, level: str) -> list[str]:
    """Keys of a rate dict that match no parameter (usually a typo or a wrong level) (chapter 1)."""
    if not isinstance(rates, dict):
        return []
    used = {partition_key(name, level) for name in names}
    return sorted(set(rates) - used)


def levels_matching(names, keys) -> list[str]:
    """The levels at which every key of ``keys`` is a partition of ``names`` (to say
    "these look like 'layer' keys" when a rate mapping is at the wrong granularity) (chapter 1)."""
    return [lv for lv in LEVELS if set(keys) <= {partition_key(n, lv) for n in names}]
