"""Introduced in chapter 7: RMS-adaptive drop rates — one DARE rate per delta matrix from its size.

The slides' method (no public code; its equations, and the readings chosen where they leave
them open, are in chapter 7 and the book's appendix "The sources' equations, and our
readings"), in four steps per delta matrix δ_k^t (expert t, matrix k of a block, role
r ∈ {attention, ffn}):

1. **Compute** rms_k^t = ‖δ_k^t‖_F / √N (the true RMS; the slide writes ‖·‖_F / N, which
   ``slide_formula=True`` reproduces), and the dispersion CV = σ/μ (in %) of the experts'
   average RMS.
2. **Drop** each entry with probability p_k^t = p_default − λ (rms_k^t − rms_mean), where
   rms_mean is the mean over *all* experts' matrices of role r when CV ≤ the threshold (50)
   and over expert t's own matrices of role r when CV is larger ("distribution-aware";
   ``aware=False`` always uses the global mean). RMS values are ~1e-3 or smaller, so a raw
   λ barely moves p: ``scale="std"`` reads λ in units of 1/σ (σ = the spread of that role's
   RMS values), so that λ = 0.1 moves a matrix one standard deviation above the mean by 0.1.
   Rates are clipped to ``clip`` (a warning says how many).
3. **Merge**: sign election and disjoint mean of the kept entries (TIES steps 2–3).
4. **Rescale** each merged matrix by 1 / (1 − min_t p_k^t).

Tensors that are not block matrices (embeddings, norms, biases, heads) are dropped at
p_default by every expert and rescaled by 1/(1 − p_default); with λ = 0 the method is then
exactly peft-style DARE-TIES with the same seed (tests/test_rms_adaptive.py). The masks are
the package's (``rng.EntryRandoms``): adaptive and DARE-TIES with one seed are paired.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from .config import MergeConfig
from .consensus import disjoint_merge, elect_sign, stack
from .drop import random_keep_mask
from .partitions import describe
from .recipes import merge_state_dicts
from .rng import EntryRandoms

MATRIX_ROLES = ("attention", "ffn")
CV_THRESHOLD = 50.0  # percent: above it, each expert is compared with its own mean
CLIP = (0.0, 0.99)  # the drop rates' default bounds


def is_matrix(name: str, tensor) -> bool:
    """A 2-D weight of a linear map inside a block, role attention or ffn (chapter 7).
    ``tensor``: the tensor, or just its shape."""
    info = describe(name)
    return len(getattr(tensor, "shape", tensor)) == 2 and info.layer is not None and info.role in MATRIX_ROLES


RMS_CHUNK = 1 << 18  # entries summed per float32 block (the streaming pass works in blocks this size)


def matrix_rms(delta: torch.Tensor, slide_formula: bool = False) -> float:
    """‖δ‖_F / √N, or the slide's ‖δ‖_F / N (chapter 7). Σδ² is summed per float32 block of
    ``RMS_CHUNK`` entries, the blocks' sums in float64 and in order — so a streamed delta,
    never held whole, gets exactly this value (``fast.streaming``)."""
    flat = delta.detach().reshape(-1)
    total = 0.0
    for s in range(0, flat.numel(), RMS_CHUNK):
        total += sum_of_squares(flat[s:s + RMS_CHUNK].float())
    return rms_from_sum(total, flat.numel(), slide_formula)


def sum_of_squares(block: torch.Tensor) -> float:
    """Σδ² of one float32 block (chapter 7's RMS)."""
    return float(torch.dot(block, block))


def rms_from_sum(total: float, n: int, slide_formula: bool = False) -> float:
    """The RMS of N entries whose squares sum to ``total`` (the slide's formula: √total / N) (chapter 7)."""
    return 0.0 if n == 0 else math.sqrt(total) / (n if slide_formula else math.sqrt(n))


def rms_table(deltas: Mapping[str, Mapping[str, torch.Tensor]], slide_formula: bool = False) -> dict[str, dict[str, float]]:
    """expert → {matrix name → rms} for every block matrix of every expert (chapter 7)."""
    return {t: {n: matrix_rms(d, slide_formula) for n, d in sd.items() if is_matrix(n, d)} for t, sd in deltas.items()}


def cv_percent(table: Mapping[str, Mapping[str, float]]) -> float:
    """The dispersion of the experts: σ/μ of their average RMS, in percent (chapter 7). σ is the
    sample standard deviation (n − 1): the slides' own table (average RMS 8.499e-4, 1.243e-4,
    1.296e-4 → CV 113.4 %) is reproduced only so; the population σ gives 92.6 % there."""
    averages = torch.tensor([sum(v.values()) / len(v) for v in table.values() if v], dtype=torch.float64)
    if len(averages) < 2 or float(averages.mean()) == 0.0:
        return 0.0
    return float(averages.std(unbiased=True) / averages.mean() * 100)


class IneffectiveDropScale(UserWarning):
    """A λ > 0 that moves no drop rate by as much as :data:`MIN_EFFECT` (chapter 7)."""


MIN_EFFECT = 1e-3  # a λ > 0 whose largest change of a rate is below this is almost surely a unit mistake


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(p_default, lam, cv_threshold, clip, scale):
    for what, value in (("p_default", p_default), ("lam", lam), ("cv_threshold", cv_threshold)):
        if not _is_number(value):
            raise TypeError(f"adaptive_rates: {what} must be a finite number, got {value!r}")
    if not (isinstance(clip, (tuple, list)) and len(clip) == 2 and all(_is_number(c) for c in clip)):
        raise TypeError(f"adaptive_rates: clip must be a pair of numbers (low, high), got {clip!r}")
    if not 0.0 <= p_default < 1.0:
        raise ValueError(f"adaptive_rates: p_default must be in [0, 1), got {p_default}")
    if lam < 0:
        raise ValueError(f"adaptive_rates: lam must be >= 0, got {lam}")
    if cv_threshold <= 0:
        raise ValueError(f"adaptive_rates: the CV threshold must be > 0 (percent), got {cv_threshold}")
    low, high = clip
    if not 0.0 <= low <= p_default <= high < 1.0:
        raise ValueError(f"adaptive_rates: clip must satisfy 0 <= low <= p_default <= high < 1, got {clip}")
    if scale not in ("raw", "std"):
        raise ValueError(f"adaptive_rates: scale must be 'raw' or 'std', got {scale!r}")


# the options of the method by name (``merge_folders(..., "rms_adaptive", **options)``): the rate rule's
# (drop_scale is the slides' λ: named so, because ``lam`` already scales the merged delta) and the merge's
RATE_OPTIONS = {"p_default", "drop_scale", "cv_threshold", "aware", "scale", "clip", "slide_formula"}
MERGE_OPTIONS = {"lam", "seed", "elect", "rescale"}


def streamed_rms_table(triples, expert_names: Sequence[str], slide_formula: bool = False) -> dict[str, dict[str, float]]:
    """:func:`rms_table` over ``(name, base, experts)`` triples read one block matrix at a time
    (a streamed merge, appendix): Σδ² per float32 block of ``RMS_CHUNK`` entries in
    :func:`matrix_rms`'s order, so the values equal the in-memory ones bit for bit (chapter 7)."""
    table = {who: {} for who in expert_names}
    for name, b, ex in triples:
        b, n = b.reshape(-1), b.numel()
        bf = torch.empty(min(n, RMS_CHUNK))  # cache-sized float32 blocks, reused: one pass over memory
        delta = torch.empty_like(bf)
        totals = dict.fromkeys(expert_names, 0.0)
        for s in range(0, n, RMS_CHUNK):
            m = min(RMS_CHUNK, n - s)
            base_block = bf[:m].copy_(b[s:s + m])
            for who, e in zip(expert_names, ex):
                totals[who] += sum_of_squares(delta[:m].copy_(e.reshape(-1)[s:s + m]).sub_(base_block))
        for who in expert_names:
            table[who][name] = rms_from_sum(totals[who], n, slide_formula)
    return table


def plan(n_experts: int, options: Mapping):
    """The method's plan (chapter 7; :mod:`merging_helpers.methods`): ``(config, finish)``.
    ``config`` has the right method and knobs (to check the inputs with) but no rates yet;
    ``finish(source)`` reads every block matrix of a :class:`~merging_helpers.tensor_source.TensorSource`
    once and returns the config to merge with (in memory and streamed alike)."""
    rate_options, merge_options = split_options(options)
    first = merge_config([{}] * n_experts, rate_options["p_default"], **merge_options)

    def finish(source):
        rates_from, expert_names = dict(rate_options), source.expert_names
        matrices = source.triples([n for n, shape in source.shapes.items() if is_matrix(n, shape)])
        table = streamed_rms_table(matrices, expert_names, rates_from.pop("slide_formula", False))
        rates, _ = adaptive_rates(table, **rates_from)
        return merge_config([rates[who] for who in expert_names], rate_options["p_default"], **merge_options)
    return first, finish


def split_options(options: Mapping) -> tuple[dict, dict]:
    """Check the options of the method by name and split them into :func:`adaptive_rates`'
    keyword arguments (plus ``slide_formula``) and :func:`merge_config`'s (chapter 7)."""
    unknown = sorted(set(options) - RATE_OPTIONS - MERGE_OPTIONS)
    if unknown:
        raise TypeError(f"rms_adaptive: unknown option(s) {unknown}; the options are "
                        f"{sorted(RATE_OPTIONS | MERGE_OPTIONS)}")
    if "p_default" not in options:
        raise TypeError("rms_adaptive needs p_default (the drop rate of a matrix of average RMS)")
    rate = {k: options[k] for k in RATE_OPTIONS if k in options}
    rate["lam"] = rate.pop("drop_scale", 0.0)
    if not _is_number(rate["lam"]):
        raise TypeError(f"rms_adaptive: drop_scale (the slides' λ) must be a finite number, got {rate['lam']!r}")
    if not rate["lam"] >= 0:
        raise ValueError(f"rms_adaptive: drop_scale (the slides' λ) must be >= 0, got {rate['lam']}")
    merge = {k: options[k] for k in MERGE_OPTIONS if k in options}
    _check(rate["p_default"], rate["lam"], rate.get("cv_threshold", CV_THRESHOLD), rate.get("clip", CLIP),
           rate.get("scale", "raw"))
    merge_config([{}], rate["p_default"], **merge)  # the merge's own checks (lam, seed)
    return rate, merge


def adaptive_rates(table: Mapping[str, Mapping[str, float]], p_default: float, lam: float,
                   cv_threshold: float = CV_THRESHOLD, aware: bool = True, scale: str = "raw",
                   clip: tuple[float, float] = CLIP) -> tuple[dict[str, dict[str, float]], dict]:
    """p_k^t for every matrix of :func:`rms_table` (chapter 7). Returns ``(rates, info)``;
    ``info`` holds the CV, whether each expert was compared with its own mean, the means and
    σ per role, and how many rates were clipped. A matrix with a zero delta has rms 0 and
    gets p_default + λ·rms_mean (it is dropped more, and dropping it changes nothing)."""
    _check(p_default, lam, cv_threshold, clip, scale)
    for t, values in table.items():
        for n, x in values.items():
            if not math.isfinite(x):
                raise ValueError(f"expert {t!r}: the RMS of {n!r} is {x}: its delta has NaN or inf entries "
                                 "(or the base's tensor has)")
    cv = cv_percent(table)
    own = aware and cv > cv_threshold
    roles = {n: describe(n).role for v in table.values() for n in v}
    pooled = {r: [x for v in table.values() for n, x in v.items() if roles[n] == r] for r in MATRIX_ROLES}
    std = {r: (float(torch.tensor(v, dtype=torch.float64).std(unbiased=False)) if len(v) > 1 else 0.0)
           for r, v in pooled.items()}
    global_mean = {r: (sum(v) / len(v) if v else 0.0) for r, v in pooled.items()}
    rates, clipped, means, largest, spread = {}, 0, {}, 0.0, 0.0
    for t, values in table.items():
        means[t] = {r: (sum(x for n, x in values.items() if roles[n] == r) / max(1, sum(roles[n] == r for n in values))
                        if own else global_mean[r]) for r in MATRIX_ROLES}
        rates[t] = {}
        for n, x in values.items():
            r = roles[n]
            unit = (1.0 / std[r] if std[r] > 0 else 0.0) if scale == "std" else 1.0
            p = p_default - lam * unit * (x - means[t][r])
            largest, spread = max(largest, abs(p - p_default)), max(spread, abs(x - means[t][r]))
            q = min(max(p, clip[0]), clip[1])
            clipped += q != p
            rates[t][n] = q
    if lam > 0 and spread > 0 and largest < MIN_EFFECT:  # (no spread: every matrix at its mean, λ is not at fault)
        warnings.warn(f"adaptive_rates: λ = {lam:g} (scale={scale!r}) moves no drop rate by as much as {MIN_EFFECT:g} "
                      f"(largest change {largest:.1e}), so the merge is DARE-TIES at p = {p_default} in effect"
                      + ("; RMS values are ~1e-4, so a raw λ must be ~1e3 or more to matter: scale='std' reads "
                         "λ in units of 1/σ" if scale == "raw" else ""), IneffectiveDropScale, stacklevel=2)
    if clipped:
        total = sum(len(v) for v in rates.values())
        warnings.warn(f"adaptive_rates: {clipped} of {total} drop rates were clipped to {clip}", stacklevel=2)
    return rates, {"cv": cv, "own_mean": own, "means": means, "std": std, "clipped": clipped}


def merge_tensor(name: str, deltas: Sequence[torch.Tensor], rates: Sequence[float], seed: int = 0,
                 elect: bool = True, rescale: bool = True) -> torch.Tensor:
    """Steps 2–4 for one tensor (chapter 7): drop entry i of expert t with probability
    ``rates[t]`` (the package's DARE masks for (seed, name, t)), elect signs and take the
    disjoint mean (``elect=False``: the plain mean over experts), rescale by 1/(1 − min rate)."""
    if len(deltas) != len(rates):
        raise ValueError(f"merge_tensor({name!r}): {len(deltas)} deltas but {len(rates)} rates")
    kept = stack([d * random_keep_mask(d, float(p), EntryRandoms(seed, name, t)) for t, (d, p) in enumerate(zip(deltas, rates))])
    merged = disjoint_merge(kept, elect_sign(kept, "total"), "count") if elect else kept.mean(0)
    return merged / (1.0 - min(float(p) for p in rates)) if rescale else merged


def merge_config(rates: Sequence[Mapping[str, float]], p_default: float, lam: float = 1.0, seed: int = 0,
                 elect: bool = True, rescale: bool = True) -> MergeConfig:
    """Steps 2–4 as the engine's data (chapter 7): DARE-TIES (``elect=False``: DARE with the
    plain mean) with one drop rate per expert and matrix (``rates[t]``, from
    :func:`adaptive_rates`; ``p_default`` for every tensor it does not name) and the
    ``"smallest"`` rescale, 1/(1 − min_t p_t) per tensor. The in-memory merge and the
    streaming one (``merge_folders(..., "rms_adaptive")``) both run it."""
    n = len(rates)
    return MergeConfig.build("dare_ties" if elect else "dare_linear", n, drop_rate=[dict(r) for r in rates],
                             rate_level="tensor", rate_default=p_default, rescale="smallest" if rescale else None,
                             weights=None if elect else [1.0 / n] * n, seed=seed, lam=lam)


def merge(base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]],
          rates: Mapping[str, Mapping[str, float]], p_default: float, lam: float = 1.0, seed: int = 0,
          elect: bool = True, rescale: bool = True) -> dict[str, torch.Tensor]:
    """θ_b + λ · (RMS-adaptive merge of the experts' deltas), through the engine (chapter 7).
    ``rates``: from :func:`adaptive_rates`; tensors it does not name use ``p_default``.
    :func:`merge_tensor` is the same merge written out for one tensor (a test compares them)."""
    names = list(experts)
    unknown = sorted(set(rates) - set(names))
    if unknown:
        raise KeyError(f"merge: rates for {unknown}, which are not experts ({names})")
    config = merge_config([rates.get(t, {}) for t in names], p_default, lam, seed, elect, rescale)
    return merge_state_dicts(base, experts, config=config, progress=False)
