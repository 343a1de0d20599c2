"""Merge recipes: short compositions of drop → rescale → combine.

Introduced in chapters 2–3. Every recipe is a function of the float32 deltas of one
tensor (one per expert) that returns the merged delta; :func:`merge_tensor` turns
that into merged weights θ_b + λ · merged, and :func:`merge_state_dicts` does it for
a whole model.

    recipe            drop (per expert)          rescale (default)   combine
    task_arithmetic   –                          –                   Σ w_t Δ_t
    magnitude         top-k |Δ|                  –                   Σ w_t Δ̂_t
    dare_linear       Bernoulli(p)               1/(1−p)             Σ w_t Δ̂_t
    ties              top-k |Δ|                  –                   elect sign + disjoint merge
    dare_ties         Bernoulli(p)               1/(1−p)             elect sign + disjoint merge
    della             MagPrune (rank in row)     1/p_i               elect sign + disjoint merge

Rates: ``density`` (kept fraction) or ``drop_rate`` = 1 − density, each a float, a
dict partition key → rate (see ``partitions.rate_for``), or a list of those with one
entry per expert (APL gives every expert its own rates).
"""
import math

import torch
from tqdm.auto import tqdm

from .consensus import ELECTIONS, MODES, disjoint_merge, elect_sign, weighted_sum
from .deltas import check_compatible, check_like_base
from .drop import global_magnitude_threshold, magnitude_keep_mask, magprune_keep, random_keep_mask, threshold_keep_mask
from .partitions import rate_for, unused_rate_keys, validate_rates
from .rescale import RESCALES, rescale as apply_rescale
from .rng import EntryRandoms

ELECTION_WEIGHTS = ("peft", "mergekit")


# ---- the three steps -----------------------------------------------------------------


def drop_and_rescale(deltas, rule, densities, *, name="", seed=0, offset=0, epsilon=0.0, thresholds=None,
                     how="auto", factor=None):
    """Drop entries of every expert's delta by ``rule`` ("magnitude", "random",
    "magprune" or None), then rescale the survivors (``how="auto"``: the rule's own
    rescale: 1/(1−p) for random, 1/p_i for magprune, none for magnitude)."""
    out = []
    if rule is None:
        return list(deltas)
    for t, (delta, density) in enumerate(zip(deltas, densities)):
        randoms, keep_prob = EntryRandoms(seed, name, t, offset), None
        if rule == "magnitude" and thresholds is not None:  # whole-model (or whole-tensor) threshold
            mask = threshold_keep_mask(delta, thresholds[t])
        elif rule == "magnitude":
            mask = magnitude_keep_mask(delta, density)
        elif rule == "random":
            mask = random_keep_mask(delta, 1.0 - density, randoms)
        elif rule == "magprune":
            mask, keep_prob = magprune_keep(delta, density, epsilon, randoms)
        else:
            raise ValueError(f"drop_and_rescale: unknown drop rule {rule!r}")
        default = {"magnitude": None, "random": "inverse", "magprune": "keep_prob"}[rule]
        kept = delta * mask
        out.append(apply_rescale(kept, default if how == "auto" else how, original=delta, drop_rate=1.0 - density,
                                 keep_prob=keep_prob, factor=factor))
    return out


def ties_combine(deltas, weights=None, election="total", election_weights="peft", mode=None, mergekit_mode="weighted_mean"):
    """Elect a sign per entry, then average the agreeing deltas (see ``consensus`` for
    the peft vs mergekit difference; ``mode`` overrides the division)."""
    if election_weights == "peft":
        signs = elect_sign(deltas, election)
        return disjoint_merge(deltas, signs, mode or "mean", weights)
    signs = elect_sign(deltas, election, weights)
    return disjoint_merge(deltas, signs, mode or mergekit_mode, weights)


# ---- the named recipes -----------------------------------------------------------------


def task_arithmetic(deltas, *, weights=None, **_):
    """Chapter 2: Σ_t w_t Δ_t."""
    return weighted_sum(deltas, weights)


def magnitude(deltas, *, densities, weights=None, **options):
    """Chapter 2: keep the top-k |Δ| of each expert, then add them up."""
    return weighted_sum(drop_and_rescale(deltas, "magnitude", densities, **_drop_options(options)), weights)


def dare_linear(deltas, *, densities, weights=None, **options):
    """Chapter 2: DARE drop + 1/(1−p) rescale, then add up."""
    return weighted_sum(drop_and_rescale(deltas, "random", densities, **_drop_options(options)), weights)


def ties(deltas, *, densities, weights=None, **options):
    """Chapter 3: trim (top-k), elect sign, disjoint mean."""
    kept = drop_and_rescale(deltas, "magnitude", densities, **_drop_options(options))
    return ties_combine(kept, weights, **_combine_options(options, "weighted_mean"))


def dare_ties(deltas, *, densities, weights=None, **options):
    """Chapter 3: DARE drop + rescale, elect sign, disjoint merge (mergekit style sums)."""
    kept = drop_and_rescale(deltas, "random", densities, **_drop_options(options))
    return ties_combine(kept, weights, **_combine_options(options, "sum"))


def della(deltas, *, densities, weights=None, **options):
    """Chapter 3: MagPrune drop + 1/p_i rescale, elect sign, disjoint merge."""
    kept = drop_and_rescale(deltas, "magprune", densities, **_drop_options(options))
    return ties_combine(kept, weights, **_combine_options(options, "weighted_mean"))


def _drop_options(options):
    keys = ("name", "seed", "offset", "epsilon", "thresholds", "how", "factor")
    return {k: options[k] for k in keys if k in options}


def _combine_options(options, mergekit_mode):
    keys = ("election", "election_weights", "mode")
    return {k: options[k] for k in keys if k in options} | {"mergekit_mode": mergekit_mode}


MERGE_METHODS = {
    "task_arithmetic": task_arithmetic,
    "magnitude": magnitude,
    "dare_linear": dare_linear,
    "ties": ties,
    "dare_ties": dare_ties,
    "della": della,
}


# ---- public entry points ---------------------------------------------------------------


def _per_expert(rates, n_experts):
    if isinstance(rates, (list, tuple)):
        if len(rates) != n_experts:
            raise ValueError(f"rates: got a list of {len(rates)} rates for {n_experts} experts")
        return list(rates)
    return [rates] * n_experts


def _validate_options(method, density, drop_rate, n_experts, weights, lam, rescale, election, election_weights, merge_mode):
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {sorted(MERGE_METHODS)}, got {method!r}")
    if density is not None and drop_rate is not None:
        raise ValueError("give either density or drop_rate (= 1 − density), not both")
    if method != "task_arithmetic" and density is None and drop_rate is None:
        raise ValueError(f"method {method!r} needs density or drop_rate")
    for rates, what in ((density, "density"), (drop_rate, "drop_rate")):
        if rates is not None:
            for r in _per_expert(rates, n_experts):
                validate_rates(r, what)
    if weights is not None and len(weights) != n_experts:
        raise ValueError(f"weights: expected one weight per expert ({n_experts}), got {len(weights)}")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam}")
    for value, allowed, what in ((rescale, RESCALES + ("auto",), "rescale"), (election, ELECTIONS, "election"),
                                 (election_weights, ELECTION_WEIGHTS, "election_weights"),
                                 (merge_mode, MODES + (None,), "merge_mode")):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def _densities_for(name, density, drop_rate, n_experts, level, default):
    if density is None and drop_rate is None:
        return [1.0] * n_experts
    rates = density if density is not None else drop_rate
    values = [rate_for(name, r, level, default) for r in _per_expert(rates, n_experts)]
    return values if density is not None else [1.0 - p for p in values]


def merge_tensor(name, base, experts_tensors, method, *, density=None, drop_rate=None, weights=None, lam=1.0,
                 seed=0, rescale="auto", rescale_factor=None, election="total", election_weights="peft",
                 merge_mode=None, epsilon=0.0, rate_level="layer_role", rate_default=None, thresholds=None,
                 offset=0, _validated=False):
    """Merge one tensor: θ_b + λ · recipe(Δ_1..Δ_T), returned in ``base``'s dtype and device.

    ``name`` seeds the random masks and picks per-partition rates. Chunks (streaming):
    ``offset`` is the chunk's flat position in the full tensor, which makes DARE masks
    (and DELLA's, for whole-row chunks) equal to the whole tensor's; ``thresholds``
    (one per expert, e.g. the tensor's or the model's k-th |Δ|) replace per-call top-k
    in magnitude/ties by |Δ| >= threshold. The "l1" rescale always uses this call's entries.
    ``rescale``: "auto" (the recipe's own), "inverse", "l1", "keep_prob", "factor"
    (with ``rescale_factor``, float or per-partition dict) or None.
    ``election_weights``/``merge_mode``: see ``consensus``.
    """
    experts_tensors = list(experts_tensors)
    if not _validated:
        _validate_options(method, density, drop_rate, len(experts_tensors), weights, lam, rescale, election,
                          election_weights, merge_mode)
        _check_tensors(name, base, experts_tensors)
    if rescale == "factor" and rescale_factor is None:
        raise ValueError("rescale='factor' needs rescale_factor (a float or a per-partition dict)")
    densities = _densities_for(name, density, drop_rate, len(experts_tensors), rate_level, rate_default)
    factor = None if rescale_factor is None else rate_for(name, rescale_factor, rate_level, 1.0)
    deltas = [expert.float() - base.float() for expert in experts_tensors]
    merged = MERGE_METHODS[method](
        deltas, densities=densities, weights=weights, name=name, seed=seed, offset=offset, epsilon=epsilon,
        thresholds=thresholds, how=rescale, factor=factor, election=election, election_weights=election_weights,
        mode=merge_mode,
    )
    return (base.float() + lam * merged).to(base.dtype)


def _check_tensors(name, base, experts_tensors):
    if not experts_tensors:
        raise ValueError(f"{name}: no expert tensors to merge")
    for t, expert in enumerate(experts_tensors):
        check_like_base(f"expert {t}", name, expert, base)


def merge_state_dicts(base_sd, expert_sds, method, *, progress=True, magnitude_scope="tensor", expert_names=None,
                      **kwargs):
    """Merge whole state dicts with ``merge_tensor`` (same keyword arguments).

    Everything is validated first (``check_compatible``, options, every tensor's rate,
    rate-dict keys that match no tensor). ``magnitude_scope="model"`` computes one
    |Δ| threshold per expert over the whole model first (TIES paper code; needs a
    float density per expert), instead of top-k within each tensor.
    Non-floating tensors (integer buffers) are copied from the base.
    """
    if isinstance(expert_sds, dict):
        expert_names, expert_sds = list(expert_sds), list(expert_sds.values())
    expert_sds = list(expert_sds)
    check_compatible(base_sd, expert_sds, expert_names)
    names = [n for n, t in base_sd.items() if t.is_floating_point()]
    n = len(expert_sds)
    _validate_options(method, kwargs.get("density"), kwargs.get("drop_rate"), n, kwargs.get("weights"),
                      kwargs.get("lam", 1.0), kwargs.get("rescale", "auto"), kwargs.get("election", "total"),
                      kwargs.get("election_weights", "peft"), kwargs.get("merge_mode"))
    level = kwargs.get("rate_level", "layer_role")
    for key in ("density", "drop_rate", "rescale_factor"):
        for rates in _per_expert(kwargs.get(key), n):
            if unused_rate_keys(names, rates, level):
                raise ValueError(f"{key}: keys {unused_rate_keys(names, rates, level)} match no tensor at level {level!r}")
    for name in names:  # raises on a missing per-partition rate before any work
        _densities_for(name, kwargs.get("density"), kwargs.get("drop_rate"), n, level, kwargs.get("rate_default"))
    if magnitude_scope not in ("tensor", "model"):
        raise ValueError(f"magnitude_scope must be 'tensor' or 'model', got {magnitude_scope!r}")
    thresholds_by_expert = None
    if magnitude_scope == "model":
        thresholds_by_expert = _global_thresholds(base_sd, expert_sds, method, kwargs)

    merged = {}
    for name, base in tqdm(base_sd.items(), desc=f"merge ({method})", disable=not progress):
        if not base.is_floating_point():
            merged[name] = base.clone()
            continue
        merged[name] = merge_tensor(name, base, [sd[name] for sd in expert_sds], method, _validated=True,
                                    thresholds=thresholds_by_expert, **kwargs)
    return merged


def _global_thresholds(base_sd, expert_sds, method, kwargs):
    if method not in ("magnitude", "ties"):
        raise ValueError(f"magnitude_scope='model' applies to 'magnitude' and 'ties', not {method!r}")
    density, drop_rate = kwargs.get("density"), kwargs.get("drop_rate")
    rates = _per_expert(density if density is not None else drop_rate, len(expert_sds))
    if any(isinstance(r, dict) for r in rates):
        raise ValueError("magnitude_scope='model' needs a float density per expert, not per-partition rates")
    densities = rates if density is not None else [1.0 - p for p in rates]

    def deltas_of(expert):  # a fresh generator per pass: the model is never concatenated
        return lambda: (expert[n].float() - b.float() for n, b in base_sd.items() if b.is_floating_point())

    return [global_magnitude_threshold(deltas_of(sd), d) for sd, d in zip(expert_sds, densities)]
