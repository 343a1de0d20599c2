"""Delta parameters (task vectors) Δ_t = θ_t − θ_b and their statistics.

Introduced in chapter 1. A state dict maps parameter names to tensors; a *delta*
maps the same names to float32 differences. Only floating-point tensors have
deltas: integer buffers (e.g. BERT's ``position_ids``) are copied from the base.
"""
import math
import warnings
from collections.abc import Iterable, Mapping

import torch

from .partitions import partition_key


def _floating(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point()


def task_vector(base_sd: dict, expert_sd: dict) -> dict:
    """Δ = θ_expert − θ_base for every floating-point tensor, in float32 (chapter 1)."""
    return {name: expert_sd[name].float() - base.float() for name, base in base_sd.items() if _floating(base)}


def task_vectors(base_sd: dict, experts) -> list[dict]:
    """One task vector per expert (``experts``: a list, or a dict name → state dict) (chapter 1)."""
    experts = list(experts.values()) if isinstance(experts, dict) else list(experts)
    return [task_vector(base_sd, expert) for expert in experts]


def apply_delta(base_sd: dict, delta: dict, scale: float = 1.0) -> dict:
    """A new state dict θ_b + scale · Δ in the base's dtypes (the input is not modified) (chapter 1)."""
    out = {}
    for name, base in base_sd.items():
        if name in delta:
            out[name] = (base.float() + scale * delta[name].to(base.device)).to(base.dtype)
        else:
            out[name] = base.clone()
    return out


def check_like_base(who: str, name: str, tensor, base) -> None:
    """Raise, naming ``who`` and tensor ``name``, unless ``tensor`` is a torch.Tensor of the base's shape and dtype (chapter 1)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{who}: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.shape != base.shape:
        raise ValueError(f"{who}: tensor {name!r} has shape {tuple(tensor.shape)}, base has {tuple(base.shape)}")
    if tensor.dtype != base.dtype:
        raise TypeError(f"{who}: tensor {name!r} has dtype {tensor.dtype}, base has {base.dtype}")


def far_from_base(base: torch.Tensor, delta: torch.Tensor) -> bool:
    """‖Δ‖ > 0.5 ‖θ_b‖ on one tensor (chapter 1: real deltas are about 1 % of the
    base's norm); on most tensors, a sign that ``base`` is not the expert's base."""
    return _far(base.float().norm(), delta.float().norm())


def _far(base_norm: torch.Tensor, delta_norm: torch.Tensor) -> bool:
    """:func:`far_from_base` from the two norms."""
    return bool(base_norm > 0 and delta_norm > 0.5 * base_norm)


def _check_state_dict(who: str, sd) -> None:
    """A state dict is a mapping of names to tensors that hold data (not meta tensors)."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"{who} must be a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    other = [n for n, t in sd.items() if not isinstance(t, torch.Tensor)]
    if other:
        raise TypeError(f"{who}: {other[0]!r} is a {type(sd[other[0]]).__name__}, not a torch.Tensor")
    meta = [n for n, t in sd.items() if t.is_meta]
    if meta:
        raise ValueError(f"{who}: tensor {meta[0]!r} (and {len(meta) - 1} more) is on the meta device and holds no "
                         "data: load the weights (e.g. from_pretrained without device_map='meta') before merging")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in: float64 for a float64 model, float32 for every other (chapter 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nonfinite_delta_message(who: str, name: str, expert, base, work=torch.float32) -> str:
    """Why a delta that is not finite is refused: NaN or inf in the inputs, or finite inputs whose
    difference overflows the dtype the merge works in (chapter 1)."""
    if bool(torch.isfinite(expert).all()) and bool(torch.isfinite(base).all()):
        return (f"{who}: tensor {name!r} is finite, but its delta (expert − base) overflows {work}, in which the "
                "merge works: the two models are too far apart in that tensor to be an expert and its base")
    return f"{who}: tensor {name!r} has NaN or inf entries (or the base has)"


def check_compatible(base_sd: dict, experts, expert_names=None) -> None:
    """Check that the experts can be merged onto ``base_sd``, before any long work (chapter 1).

    Raises ValueError for: no experts, different tensor names or shapes, NaN/inf in a
    delta; TypeError for different dtypes. Warns when ``base_sd`` does not look like the
    experts' base (relative delta norm ‖Δ‖/‖θ_b‖ > 0.5 on most tensors).
    """
    _check_state_dict("the base", base_sd)
    if isinstance(experts, Mapping) and experts and all(isinstance(v, torch.Tensor) for v in experts.values()):
        raise TypeError("the experts must be a list of state dicts (or a mapping name → state dict), got one state "
                        "dict: wrap it in a list, [expert]")
    if isinstance(experts, Mapping):
        expert_names, experts = list(experts), list(experts.values())
    if experts is None or isinstance(experts, (str, torch.Tensor)) or not isinstance(experts, Iterable):
        raise TypeError(f"the experts must be a list of state dicts, got {type(experts).__name__}")
    experts = list(experts)
    if not experts:
        raise ValueError("check_compatible: the list of experts is empty; merging needs at least one expert")
    for i, expert in enumerate(experts):
        _check_state_dict(f"expert {i}" if expert_names is None else repr(list(expert_names)[i]), expert)
    names = list(expert_names) if expert_names is not None else [f"expert {i}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise ValueError(f"check_compatible: {len(names)} expert_names for {len(experts)} experts")
    base_norms = {}
    for who, expert in zip(names, experts):
        missing, extra = sorted(set(base_sd) - set(expert)), sorted(set(expert) - set(base_sd))
        if missing or extra:
            raise ValueError(f"{who}: tensor names differ from the base: missing {missing[:5]}, extra {extra[:5]}")
        far = 0
        for name, base in base_sd.items():
            tensor = expert[name]
            check_like_base(who, name, tensor, base)
            if not _floating(base):
                continue
            work = work_dtype(base.dtype)
            delta = tensor.to(work) - base.to(work).to(tensor.device)
            delta_norm = delta.norm()  # NaN or inf unless every entry is finite (or the sum overflows)
            if not bool(torch.isfinite(delta_norm)) and not bool(torch.isfinite(delta).all()):
                raise ValueError(nonfinite_delta_message(who, name, tensor, base, work))
            if name not in base_norms:  # once per tensor, not once per expert
                base_norms[name] = base.float().norm()
            far += _far(base_norms[name], delta_norm)
        n_floating = sum(_floating(t) for t in base_sd.values())
        if far > n_floating / 2:
            warnings.warn(
                f"{who}: ‖Δ‖/‖θ_b‖ > 0.5 on {far} of {n_floating} tensors; is the base really this expert's base?",
                stacklevel=2,
            )


# ---- statistics plotted in chapter 1 -------------------------------------------------


def _magnitude(values: torch.Tensor, signed: bool) -> torch.Tensor:
    return values if signed else values.abs()


def delta_quantiles(delta: dict, qs, max_exact: int = 1 << 24, sample_size: int = 1 << 22, seed: int = 0,
                    signed: bool = False) -> torch.Tensor:
    """Quantiles ``qs`` of |Δ| over the whole model (of the signed Δ with ``signed=True``,
    as in DPPA's offset table, whose 0 and 1 quantiles are the most negative and the
    most positive entry) (chapter 1).

    Exact up to ``max_exact`` entries; above, estimated from ``sample_size`` entries
    drawn uniformly over the model (each tensor contributes in proportion to its size;
    the standard error of a quantile q is about sqrt(q(1−q)/sample_size) in rank).
    """
    qs = torch.as_tensor(qs, dtype=torch.float64)
    if ((qs < 0) | (qs > 1)).any():
        raise ValueError(f"delta_quantiles: qs must lie in [0, 1], got {qs.tolist()}")
    total = sum(t.numel() for t in delta.values())
    if total <= max_exact:
        values = torch.cat([_magnitude(t.detach().reshape(-1).float(), signed).cpu() for t in delta.values()])
    else:
        generator = torch.Generator().manual_seed(seed)
        parts = []
        for t in delta.values():
            m = math.ceil(sample_size * t.numel() / total)
            index = torch.randint(t.numel(), (m,), generator=generator)
            parts.append(_magnitude(t.detach().reshape(-1)[index.to(t.device)].float(), signed).cpu())
        values = torch.cat(parts)
    values = values.sort().values.double()
    position = qs * (len(values) - 1)  # linear interpolation, like torch.quantile
    low, high = position.floor().long(), position.ceil().long()
    return (values[low] + (position - low) * (values[high] - values[low])).float()


def cosine_similarity_matrix(deltas: list[dict]) -> torch.Tensor:
    """T × T cosine similarities of whole-model task vectors (accumulated tensor by tensor) (chapter 1)."""
    gram = torch.zeros(len(deltas), len(deltas), dtype=torch.float64)
    for name in deltas[0]:
        rows = torch.stack([d[name].detach().reshape(-1).double() for d in deltas])
        gram += (rows @ rows.T).cpu()
    norms = gram.diag().sqrt().clamp_min(1e-30)
    return (gram / norms[:, None] / norms[None, :]).float()


def sign_disagreement_counts(deltas: list[dict]) -> tuple[int, int]:
    """The two counts behind :func:`sign_disagreement`: (entries where some nonzero deltas
    are positive and others negative, entries where at least two experts are nonzero).
    Counts of disjoint parts of a model add up, fractions do not (chapter 1 sums them
    over layer × role cells)."""
    disagree = contested = 0
    for name in deltas[0]:
        signs = torch.stack([d[name].detach().sign() for d in deltas])
        disagree += int(((signs > 0).any(0) & (signs < 0).any(0)).sum())
        contested += int(((signs != 0).sum(0) >= 2).sum())
    return disagree, contested


def sign_disagreement(deltas: list[dict]) -> float:
    """Fraction of entries, among those where at least two experts have a nonzero
    delta, on which some nonzero deltas are positive and others negative (chapter 3's
    "interference"). For dense deltas the denominator is every entry."""
    disagree, contested = sign_disagreement_counts(deltas)
    return disagree / contested if contested else 0.0


def rms_by_partition(delta: dict, level="layer_role") -> dict[str, float]:
    """True RMS sqrt(Σ Δ² / N) of each partition (``level`` as in ``partitions``; a
    tuple such as ("layer", "role") means "layer_role"). The RMS slides write
    ‖Δ‖_F / N instead; multiply by 1/sqrt(N) yourself to reproduce them (chapter 1)."""
    if isinstance(level, tuple):
        level = "_".join(level)
    squares, counts = {}, {}
    for name, t in delta.items():
        key = partition_key(name, level)
        squares[key] = squares.get(key, 0.0) + float(t.detach().double().pow(2).sum())
        counts[key] = counts.get(key, 0) + t.numel()
    return {key: math.sqrt(squares[key] / counts[key]) for key in squares}
