"""Parameter names → layer, role and linear type.

Introduced in chapter 1: every method of the book groups delta parameters into
*partitions* (the whole model, one layer, the attention of one layer, one linear
map...) and often gives each partition its own drop rate. This module turns a
parameter name into a partition key, for BERT-style and Llama-style checkpoints.

Roles: ``attention``, ``ffn``, ``embedding``, ``norm``, ``head`` (the pooler,
classifier, ``lm_head`` and MLM head count as head), ``other`` (unknown names).
Linear types: ``q k v o`` (attention) and ``up gate down`` (FFN). A bias belongs to
the linear map it is added in (``query.bias`` is part of ``q``).
"""
import re
from collections import defaultdict
from typing import NamedTuple

LEVELS = ("model", "layer", "role", "linear", "layer_role", "layer_linear", "tensor")


class ParamInfo(NamedTuple):
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
    """Layer index, role and linear type of a parameter name.

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
    """The partition a parameter belongs to at ``level`` (one of ``LEVELS``).

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
    """Partition ``names`` into ``{key: [names...]}``; every name lands in exactly one group."""
    groups = defaultdict(list)
    for name in names:
        groups[partition_key(name, level)].append(name)
    return dict(groups)


def validate_rates(rates, what: str = "drop_rate") -> None:
    """Check a float or ``{partition key: float}`` of drop rates or densities.

    Drop rates must lie in [0, 1) (p = 1 would divide by zero in DARE);
    densities in (0, 1]. The error names the bad key.
    """
    if what not in ("drop_rate", "density"):
        raise ValueError(f"validate_rates: what must be 'drop_rate' or 'density', got {what!r}")
    items = rates.items() if isinstance(rates, dict) else [(None, rates)]
    for key, rate in items:
        where = f"{what}" if key is None else f"{what}[{key!r}]"
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"{where} must be a float, got {type(rate).__name__}")
        ok = 0.0 <= rate < 1.0 if what == "drop_rate" else 0.0 < rate <= 1.0
        if not ok:
            allowed = "[0, 1)" if what == "drop_rate" else "(0, 1]"
            raise ValueError(f"{where} = {rate} is outside the allowed range {allowed}")


def rate_for(name: str, rates, level: str = "layer_role", default: float | None = None) -> float:
    """The rate of parameter ``name``: ``rates`` itself if it is a float, else
    ``rates[partition_key(name, level)]`` (or ``default`` when the key is missing).

    This is how per-partition drop rates (APL, DPPA, RMS-adaptive) reach the engine.
    """
    if not isinstance(rates, dict):
        return float(rates)
    key = partition_key(name, level)
    if key in rates:
        return float(rates[key])
    if default is None:
        raise KeyError(f"rate_for: no rate for partition {key!r} of {name!r} (level {level!r}) and no default")
    return float(default)


def unused_rate_keys(names, rates, level: str) -> list[str]:
    """Keys of a rate dict that match no parameter (usually a typo or a wrong level)."""
    if not isinstance(rates, dict):
        return []
    used = {partition_key(name, level) for name in names}
    return sorted(set(rates) - used)
