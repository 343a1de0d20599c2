"""The reference merge engine: drop → rescale → combine, read from the method records.

Introduced in chapters 2–3. A method (:mod:`merging_helpers.methods`) names a drop
rule, its rescale and a combine rule; a :class:`~merging_helpers.config.MergeConfig`
holds the rates, weights and switches. :func:`merge_deltas` applies them to the
float32 deltas of one tensor (one per expert) and returns the merged delta;
:func:`merge_tensor` turns that into merged weights θ_b + λ · merged, and
:func:`merge_state_dicts` does it for a whole model.

This is the readable engine, and the reference: the fast tier
(:mod:`merging_helpers.fast`) must give the same numbers bit for bit.
"""

import torch
from tqdm.auto import tqdm

from .config import MergeConfig, as_config, start_config
from .consensus import disjoint_merge, elect_sign, weighted_sum
from .deltas import check_compatible, check_like_base, nonfinite_delta_message, work_dtype
from .drop import (BREADCRUMBS_GAMMA, breadcrumbs_keep_mask, global_magnitude_threshold, magnitude_keep_mask, magprune_keep,
                   random_keep_mask, threshold_keep_mask)
from .methods import METHODS, RULE_RESCALE
from .partitions import PerColumn, PerRow, complement
from .rescale import rescale as apply_rescale
from .rng import EntryRandoms
from .tensor_source import StateDictSource


# ---- the three steps -----------------------------------------------------------------


def drop_and_rescale(deltas, rule, densities, *, name="", seed=0, offset=0, thresholds=None, rescale="auto",
                     factor=None, **rule_knob):
    """Chapter 2: drop entries of every expert's delta by ``rule`` ("magnitude", "random",
    "magprune", "breadcrumbs" or None), then rescale the survivors (``rescale="auto"``: the rule's own
    rescale: 1/(1−p) for random, 1/p_i for magprune, none for magnitude; ``"smallest"``:
    every expert by 1/(1 − min_t p_t), chapter 7).
    ``densities``: one per expert, a float or a PerRow / PerColumn vector. The rule's own knob goes
    by name: ``epsilon`` (MagPrune's band, default 0) or ``gamma`` (breadcrumbs' outliers, default 0.01)."""
    if rule is None:
        return list(deltas)
    if rule not in RULE_RESCALE:
        raise ValueError(f"drop_and_rescale: unknown drop rule {rule!r}")
    unknown = sorted(set(rule_knob) - {"epsilon", "gamma"})
    if unknown:
        raise TypeError(f"drop_and_rescale: unknown option(s) {unknown}; a rule's knob is epsilon or gamma")
    epsilon, gamma = rule_knob.get("epsilon", 0.0), rule_knob.get("gamma")
    gamma = BREADCRUMBS_GAMMA if gamma is None else gamma
    how = RULE_RESCALE[rule] if rescale == "auto" else rescale
    smallest = smallest_drop_rate(densities, name) if how == "smallest" else None
    out = []
    for t, (delta, density) in enumerate(zip(deltas, densities)):
        randoms, keep_prob = EntryRandoms(seed, name, t, offset), None
        drop_rate = complement(density)
        if rule == "magnitude" and thresholds is not None:  # whole-model (or whole-tensor) threshold
            mask = threshold_keep_mask(delta, thresholds[t])
        elif rule == "magnitude":
            mask = magnitude_keep_mask(delta, density)
        elif rule == "random":
            mask = random_keep_mask(delta, drop_rate, randoms)
        elif rule == "breadcrumbs":
            mask = breadcrumbs_keep_mask(delta, density, gamma)
        else:
            mask, keep_prob = magprune_keep(delta, density, epsilon, randoms)
        out.append(apply_rescale(delta * mask, how, original=delta, keep_prob=keep_prob, factor=factor,
                                 drop_rate=drop_rate if smallest is None else smallest))
    return out


def smallest_drop_rate(densities, name=""):
    """min_t p_t of one tensor: the ``"smallest"`` rescale's rate (chapter 7's RMS-adaptive rule)."""
    if any(isinstance(d, (PerRow, PerColumn)) for d in densities):
        raise ValueError(f"{name!r}: rescale='smallest' needs one float rate per expert, not per-row / per-column rates")
    return min(1.0 - d for d in densities)


def combine(deltas, config: MergeConfig):
    """Chapters 2–3: add the (dropped) deltas up, or elect a sign per entry and merge
    the agreeing ones (on the weighted deltas if ``config.weighted_election``)."""
    if not config.method.elects:
        return weighted_sum(deltas, config.weights)
    signs = elect_sign(deltas, config.election, config.weights if config.weighted_election else None)
    return disjoint_merge(deltas, signs, config.divisor, config.weights)


def merge_deltas(name, deltas, config: MergeConfig, offset: int = 0):
    """The merged delta of tensor ``name`` from the experts' float32 (float64 for a float64 model)
    ``deltas`` (chapters 2–3)."""
    m = config.method
    kept = drop_and_rescale(deltas, m.drop, config.densities(name), name=name, seed=config.seed, offset=offset,
                            epsilon=config.epsilon, thresholds=config.thresholds, rescale=config.rescale,
                            factor=config.factor(name), gamma=config.gamma)
    return combine(kept, config)


# ---- public entry points ---------------------------------------------------------------


def merge_tensor(name, base, experts_tensors, method=None, *, config=None, offset=0, **options):
    """Merge one tensor (chapters 2–3): θ_b + λ · merged delta, in ``base``'s dtype (or the
    config's ``out_dtype``) and device.

    ``method`` and the keyword options (see :class:`~merging_helpers.config.MergeConfig`)
    or a ready ``config``. ``name`` seeds the random masks and picks per-partition rates.
    Chunks (streaming): ``offset`` is the chunk's flat position in the full tensor,
    which makes DARE masks (and DELLA's, for whole-row chunks) equal to the whole
    tensor's; ``config.thresholds`` (one per expert, e.g. the model's k-th |Δ|)
    replace per-call top-k by |Δ| >= threshold. The "l1" rescale always uses this call's entries.
    """
    experts_tensors = list(experts_tensors)
    if not experts_tensors:
        raise ValueError(f"{name}: no expert tensors to merge")
    config = as_config(method, len(experts_tensors), config, **options)
    for t, expert in enumerate(experts_tensors):
        check_like_base(f"expert {t}", name, expert, base)
    config.check_fits(name, tuple(base.shape))
    return merge_validated_tensor(name, base, experts_tensors, config, offset)


def merge_validated_tensor(name, base, experts_tensors, config, offset=0, check_finite=True):
    """:func:`merge_tensor` once its inputs and config are checked (chapters 2–3); ``check_finite=False``
    where the whole model's deltas were checked for NaN / inf already."""
    work = work_dtype(base.dtype)  # float64 models keep their precision
    deltas = [expert.to(work) - base.to(work) for expert in experts_tensors]
    for t, delta in enumerate(deltas if check_finite else []):
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(nonfinite_delta_message(f"expert {t}", name, experts_tensors[t], base, work))
    merged = merge_deltas(name, deltas, config, offset)
    exact = base.to(work) + config.lam * merged
    target = config.output_dtype(base.dtype)
    # beyond the dtype's range: inf in float16/bfloat16/float32, clamped without a word in float8
    overflow = ~torch.isfinite(exact) | (exact.abs() > torch.finfo(target).max)
    if bool(overflow.any()):
        raise OverflowError(overflow_message(name, target, int(overflow.sum())))
    return exact.to(target)


def overflow_message(name: str, dtype, count: int) -> str:
    """Why a merge is refused when its result is not finite (chapter 3; both engines say the same)."""
    return (f"tensor {name!r}: {count} merged entries overflow {dtype} (finite inputs, an infinite result): "
            "lower lam or the weights, or merge the model in a wider dtype; nothing was written")


def merge_state_dicts(base_sd, expert_sds, method=None, *, config=None, progress=True, expert_names=None,
                      **options):
    """Merge whole state dicts tensor by tensor (chapters 2–3; options as ``merge_tensor``).

    Everything is validated first (``check_compatible``, the config, every tensor's
    rate, rate keys that match no tensor). ``magnitude_scope="model"`` computes one
    |Δ| threshold per expert over the whole model first (TIES paper code; needs a
    float density per expert), instead of top-k within each tensor. A planned method
    (``"apl"``, ``"dp"``, ``"rms_adaptive"``: :data:`~merging_helpers.methods.PLANNED`, with
    its own options) reads the model for its config first, as the streamed merge does.
    Non-floating tensors (integer buffers) are copied from the base.
    The same numbers, faster on a CPU: :func:`merging_helpers.fast.in_memory.merge_state_dicts`.
    """
    config, expert_sds = plan_state_dict_merge(base_sd, expert_sds, method, config, options, expert_names)
    merged = {}
    for name, base in tqdm(base_sd.items(), desc=f"merge ({config.method.name})", disable=not progress):
        if not base.is_floating_point():
            merged[name] = base.clone()
            continue
        # check_compatible has checked every delta for NaN / inf already
        merged[name] = merge_validated_tensor(name, base, [sd[name] for sd in expert_sds], config, check_finite=False)
    return merged


def plan_state_dict_merge(base_sd, expert_sds, method, config, options, expert_names=None):
    """``(config, experts)`` for a merge of whole state dicts, everything checked before any
    merging (chapters 2–3): the inputs, the options, every tensor's rate; a planned method's
    plan read from the model; whole-model thresholds for ``magnitude_scope="model"``.
    ``experts``: the expert state dicts as a list."""
    check_compatible(base_sd, expert_sds, expert_names)  # first: it names a wrongly shaped argument
    if isinstance(expert_sds, dict):
        expert_names, expert_sds = list(expert_sds), list(expert_sds.values())
    expert_sds = list(expert_sds)
    config, finish = start_config(method, len(expert_sds), config, options)
    config.check_tensors({n: tuple(t.shape) for n, t in base_sd.items() if t.is_floating_point()})
    if finish is not None:
        names = list(expert_names) if expert_names else [f"expert {t}" for t in range(len(expert_sds))]
        config = finish(StateDictSource(base_sd, expert_sds, names))
    if config.magnitude_scope == "model":
        def deltas_of(expert):
            return lambda: (expert[n].float() - b.float() for n, b in base_sd.items() if b.is_floating_point())

        config = config.replace(thresholds=model_thresholds([deltas_of(sd) for sd in expert_sds], config))
    return config, expert_sds


def model_thresholds(expert_deltas, config):
    """``magnitude_scope="model"`` (chapter 3): per expert, the |Δ| threshold that keeps its
    density of the whole model, by two histogram passes over ``expert_deltas[t]()`` (a
    fresh iterable of expert t's deltas: the model is never concatenated). The streaming
    merge passes deltas read from disk."""
    return tuple(global_magnitude_threshold(deltas, d) for deltas, d in zip(expert_deltas, config.densities("")))


def _recipe(method_name):
    def recipe(deltas, *, densities=None, weights=None, name="", offset=0, **options):
        deltas = list(deltas)
        rates = {} if densities is None else {"density": list(densities)}
        config = MergeConfig.build(method_name, len(deltas), weights=weights, **rates, **options)
        return merge_deltas(name, deltas, config, offset)

    recipe.__name__ = method_name
    recipe.__doc__ = (f"Chapter {METHODS[method_name].chapter}: the merged delta of ``{method_name}`` "
                      "from float32 deltas (see the table in ``methods``).")
    return recipe


task_arithmetic, magnitude, dare_linear = (_recipe(n) for n in ("task_arithmetic", "magnitude", "dare_linear"))
ties, dare_ties, della = (_recipe(n) for n in ("ties", "dare_ties", "della"))

__all__ = ["drop_and_rescale", "combine", "merge_deltas", "merge_tensor", "merge_state_dicts", "model_thresholds",
           "task_arithmetic", "magnitude", "dare_linear", "ties", "dare_ties", "della"]
