"""Our merge configurations as mergekit YAML, and mergekit YAML as our configurations.

Introduced in chapter 8's appendix ("Merging at scale"). mergekit describes a merge in a
YAML file (``merge_method``, ``base_model``, ``models`` with per-model ``weight`` and
``density``, shared ``parameters``); :class:`~merging_helpers.config.MergeConfig` holds
the same choices under the book's names. The methods both tools share translate both
ways; what one side cannot say is refused with the option that cannot be said:

    mergekit                                ours (MergeConfig)
    merge_method  task_arithmetic           method task_arithmetic
                  dare_linear, ties,        the same name
                  dare_ties, della,
                  breadcrumbs,
                  breadcrumbs_ties
                  linear (import only)      task_arithmetic with weights w_t / Σw (a base_model is
                                            needed; Σ w θ / Σ w = θ_b + Σ (w_t / Σw) Δ_t)
    weight (per model)                      weights
    density (per model)                     density (a list, one per expert); a magnitude trim
                                            (ties, breadcrumbs) keeps int(d·n) entries there:
                                            the import sets count_rounding="floor" to match
    epsilon (per model, della)              epsilon (one value for all experts)
    gamma (per model, breadcrumbs)          gamma (one value for all experts; mergekit's default 0.01)
    lambda                                  lam
    normalize  true / false                 divide_by "weight_sum" / "nothing" (elect methods);
                                            weights divided by their sum (sum methods)
    rescale    true / false                 rescale "l1" / None (mergekit's DARE and DELLA
                                            rescale matches the L1 norm, not 1/(1 − p))
    (always: sign elected on weighted Δ)    weighted_election=True, election "total"

The random masks cannot match: mergekit draws from torch's global generator, we from
counter-based words keyed by (seed, tensor, expert) (chapter 2), so a DARE merge agrees
with mergekit's in distribution, not entry by entry. YAML is read with ``yaml.safe_load``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .config import OUT_DTYPES, MergeConfig
from .drop import BREADCRUMBS_GAMMA
from .methods import COUNT_RULES, get_method, registry

SHARED_METHODS = tuple(m.name for m in registry().values() if m.mergekit)  # the records that name a mergekit method
# mergekit's defaults (0.1.5, merge_methods/registry.py): normalize, rescale
DEFAULTS = {"task_arithmetic": (False, False), "dare_linear": (False, True), "ties": (True, False),
            "dare_ties": (False, True), "della": (True, True), "breadcrumbs": (False, False),
            "breadcrumbs_ties": (False, False)}
# the per-model knobs of one drop rule: name → (mergekit's default, the methods that take it)
KNOBS = {"epsilon": (0.15, ("della",)), "gamma": (BREADCRUMBS_GAMMA, ("breadcrumbs", "breadcrumbs_ties"))}
MODEL_KEYS = {"weight", "density", "epsilon", "gamma"}
SHARED_KEYS = {"normalize", "rescale", "lambda", "int8_mask"}


# top-level keys: what the import reads, and mergekit's others, which it accepts and does not apply
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "slices"}


class NotRepresentable(ValueError):
    """A merge option one of the two tools cannot express (chapter 8's appendix)."""


def _number(value, what: str) -> float:
    """A YAML number (not a boolean, not a string), finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    return float(value)


def _boolean(value, what: str) -> bool:
    """A real YAML boolean: a quoted 'false' is a non-empty string, which Python would read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{what}: expected true or false (an unquoted YAML boolean), got {value!r}")
    return value


def _model_entries(models) -> list[dict]:
    if not isinstance(models, list) or not models:
        raise ValueError("models: expected a list of {model: ..., parameters: ...}")
    for i, e in enumerate(models):
        if not isinstance(e, dict) or "model" not in e:
            raise ValueError(f"models[{i}]: expected a mapping with a 'model' key (- model: <path>, parameters: "
                             f"{{weight: ...}}), got {e!r}")
        if not isinstance(e.get("parameters") or {}, dict):
            raise ValueError(f"models[{i}] ({e['model']!r}): parameters must be a mapping, got {e['parameters']!r}")
    return models


def _floats(value, n: int, what: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, (int, float)) for v in value):
            raise NotRepresentable(f"{what}: mergekit takes one number per model; got {value!r}")
        return [float(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    raise NotRepresentable(f"{what}: mergekit takes one number per model, not per-partition or per-row rates "
                           f"(got a {type(value).__name__})")


def _model_parameters(entry: dict, shared: dict) -> dict:
    """One model's parameters: the shared ones it may take, overridden by its own; each understood,
    a plain number (not a per-layer gradient), and a weight among them."""
    params = {**{k: v for k, v in shared.items() if k in MODEL_KEYS}, **(entry.get("parameters") or {})}
    bad = sorted(set(params) - MODEL_KEYS)
    if bad:
        raise NotRepresentable(f"model {entry.get('model')!r}: parameters {bad} are not understood")
    if any(isinstance(v, (list, dict)) for v in params.values()):
        raise NotRepresentable(f"model {entry.get('model')!r}: gradient (per-layer) parameters are not supported")
    if "weight" not in params:
        raise ValueError(f"model {entry.get('model')!r}: mergekit needs a weight for every model")
    return params


def _from_linear(doc: dict, base: str) -> tuple[MergeConfig, list[str]]:
    """mergekit's ``linear`` (Σ_t w_t θ_t / Σ w, or Σ w_t θ_t without ``normalize``) as Task Arithmetic
    on the experts' deltas: θ_b + Σ_t (w_t / W) Δ_t, W = Σ w over every listed model, the base's
    weight too when the base is listed. A merge that scales the base (Σ w ≠ 1, unnormalised) is refused."""
    entries = _model_entries(doc.get("models"))
    shared = dict(doc.get("parameters") or {})
    if set(shared) - {"normalize", "weight"}:
        raise NotRepresentable(f"linear: parameters {sorted(set(shared) - {'normalize', 'weight'})} are not "
                               "understood; known: ['normalize', 'weight']")
    weights = []
    for e in entries:
        params = {**shared, **(e.get("parameters") or {})}
        params.pop("normalize", None)
        if set(params) - {"weight"}:
            raise NotRepresentable(f"model {e['model']!r}: linear takes only a weight, got {sorted(params)}")
        if "weight" not in params:
            raise ValueError(f"model {e['model']!r}: mergekit needs a weight for every model")
        weights.append(_number(params["weight"], f"model {e['model']!r}: weight"))
    total = sum(weights)
    if _boolean(shared.get("normalize", True), "parameters.normalize"):
        if abs(total) < 1e-8:
            raise ValueError(f"linear: the weights {weights} sum to 0, so normalize divides by 0")
        weights = [w / total for w in weights]
    elif abs(total - 1.0) > 1e-6:
        raise NotRepresentable(f"linear with normalize: false and weights summing to {total:g} scales the base "
                               "model itself by that sum; that is not a task-vector merge (make the weights sum to "
                               "1, or normalize)")
    experts = [(str(e["model"]), w) for e, w in zip(entries, weights) if str(e["model"]) != str(base)]
    if not experts:
        raise ValueError("linear: the models list holds only the base model")
    config = MergeConfig.build("task_arithmetic", len(experts), weights=[w for _, w in experts], lam=1.0,
                               out_dtype=_out_dtype(doc))
    return config, [name for name, _ in experts]


def to_mergekit(config: MergeConfig, base_model: str, models: Sequence[str], dtype: str = "bfloat16") -> str:
    """The mergekit YAML of ``config`` merging ``models`` onto ``base_model`` (chapter 8's appendix).
    Raises :class:`NotRepresentable` naming the option mergekit cannot express."""
    import yaml
    m = config.method
    if m.name not in SHARED_METHODS:
        raise NotRepresentable(f"method {m.name!r} has no mergekit counterpart; shared methods: {SHARED_METHODS}")
    n = config.n_experts
    if len(models) != n:
        raise ValueError(f"the config merges {n} experts, got {len(models)} model paths")
    weights = list(config.weights) if config.weights is not None else [1.0] * n
    unit = all(w == 1.0 for w in weights)
    if m.elects:
        if config.election != "total":
            raise NotRepresentable(f"election={config.election!r}: mergekit elects by the total (sum) only")
        if not config.weighted_election and not unit:
            raise NotRepresentable("weighted_election=False with unequal weights: mergekit elects the sign on the "
                                   "weighted deltas (set weighted_election=True)")
        divisor = config.divisor
        if divisor == "count" and not unit:
            raise NotRepresentable("divide_by='count' with unequal weights: mergekit divides by the sum of the "
                                   "agreeing weights (divide_by='weight_sum') or not at all ('nothing')")
        normalize = divisor != "nothing"
    else:
        normalize = False
    rescale = None if config.rescale == "auto" and m.rescale is None else config.rescale
    if m.needs_rate:
        if rescale not in ("l1", None):
            raise NotRepresentable(f"rescale={config.rescale!r}: mergekit's {m.name} rescales by L1 norm matching "
                                   "(rescale='l1') or not at all (rescale=None)")
    elif rescale is not None:
        raise NotRepresentable(f"rescale={config.rescale!r}: {m.name} drops nothing, so it has nothing to rescale")
    densities = [1.0] * n
    if m.needs_rate:
        if config.density is not None:
            densities = _floats(config.density, n, "density")
        else:
            densities = [1.0 - p for p in _floats(config.drop_rate, n, "drop_rate")]
    if config.rescale_factor is not None or config.thresholds is not None or config.magnitude_scope != "tensor":
        raise NotRepresentable("rescale_factor, thresholds and magnitude_scope='model' have no mergekit counterpart")
    entries = []
    for path, w, d in zip(models, weights, densities):
        params = {"weight": w}
        if m.needs_rate:
            params["density"] = d
        if m.name == "della":
            params["epsilon"] = float(config.epsilon)
        if m.drop == "breadcrumbs":
            params["gamma"] = BREADCRUMBS_GAMMA if config.gamma is None else float(config.gamma)
        entries.append({"model": str(path), "parameters": params})
    doc = {"merge_method": m.mergekit, "base_model": str(base_model), "models": entries,
           "parameters": {"normalize": normalize, "rescale": rescale == "l1", "lambda": float(config.lam)},
           "dtype": dtype, **({"out_dtype": config.out_dtype} if config.out_dtype else {})}
    header = f"# written by merging_helpers.mergekit_yaml (seed {config.seed}: mergekit's masks use its own RNG)\n"
    if m.drop in COUNT_RULES and config.count_rounding == "round":
        header += ("# mergekit keeps int(density·n) entries of each tensor, this config round(density·n): the merges are\n"
                   "# equal where density·n is whole (count_rounding='floor' keeps mergekit's count)\n")
    return header + yaml.safe_dump(doc, sort_keys=False)


def _out_dtype(doc: dict) -> str | None:
    """The dtype mergekit writes the merge in (``out_dtype``, else ``dtype``), as MergeConfig.out_dtype."""
    key = "out_dtype" if doc.get("out_dtype") is not None else "dtype"
    value = doc.get(key)
    if value is not None and value not in OUT_DTYPES:
        raise ValueError(f"{key}: {value!r} is not a dtype this import writes; one of {tuple(OUT_DTYPES)}")
    return value


def from_mergekit(text: str) -> tuple[MergeConfig, str, list[str], str | None]:
    """``(config, base_model, models, dtype)`` from a mergekit YAML (chapter 8's appendix).
    Raises :class:`NotRepresentable` for what our engine cannot run as mergekit would."""
    import warnings

    import yaml
    if not isinstance(text, str):
        raise TypeError(f"from_mergekit takes the YAML text (a str), got a {type(text).__name__}")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError("a mergekit config is a YAML mapping with merge_method, base_model and models")
    ignored = sorted(set(doc) - TOP_LEVEL_KEYS)
    if ignored:
        warnings.warn(f"from_mergekit: {ignored} are not applied by this import (only merge_method, base_model, "
                      "models, parameters and dtype are read)", UserWarning, stacklevel=2)
    if "slices" in doc:
        raise NotRepresentable("'slices' (layer ranges from different models) are not supported; list whole models")
    method = doc.get("merge_method")
    if method not in (*SHARED_METHODS, "linear"):
        raise NotRepresentable(f"merge_method {method!r} has no counterpart here; shared methods: "
                               f"{(*SHARED_METHODS, 'linear')}")
    base, models = doc.get("base_model"), doc.get("models")
    if not base:
        raise ValueError(f"{method}: this import merges task vectors: mergekit's task-vector methods need a base_model"
                         + (" (the models' common base: Σ w θ / Σ w = θ_b + Σ (w / Σ w) Δ)" if method == "linear"
                            else ""))
    if method == "linear":
        config, names = _from_linear(doc, str(base))
        return config, str(base), names, doc.get("dtype")
    models = [e for e in _model_entries(models) if str(e["model"]) != str(base)]  # mergekit lets the base be listed
    if not isinstance(doc.get("parameters") or {}, dict):
        raise ValueError(f"parameters must be a mapping, got {doc['parameters']!r}")
    shared = dict(doc.get("parameters") or {})
    unknown = sorted(set(shared) - SHARED_KEYS - MODEL_KEYS)
    if unknown:
        raise NotRepresentable(f"parameters {unknown} are not understood; known: {sorted(SHARED_KEYS | MODEL_KEYS)}")
    per_model = [_model_parameters(e, shared) for e in models]
    stray = sorted({k for p in per_model for k in p if k in KNOBS and method not in KNOBS[k][1]})
    if stray:
        raise NotRepresentable(f"parameters {stray} do not apply to {method} (epsilon: della; gamma: breadcrumbs)")
    default_normalize, default_rescale = DEFAULTS[method]
    normalize = _boolean(shared.get("normalize", default_normalize), "parameters.normalize")
    rescale = _boolean(shared.get("rescale", default_rescale), "parameters.rescale")
    weights = [_number(p["weight"], f"model {e['model']!r}: weight") for p, e in zip(per_model, models)]
    options = {"lam": _number(shared.get("lambda", 1.0), "parameters.lambda")}
    if get_method(method).elects:
        options["weighted_election"] = True
        options["divide_by"] = "weight_sum" if normalize else "nothing"
    elif normalize:
        total = sum(weights)
        weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
    options["weights"] = weights
    if method != "task_arithmetic":
        densities = [_number(p.get("density", 1.0), f"model {e['model']!r}: density") for p, e in zip(per_model, models)]
        options["density"] = densities[0] if len(set(densities)) == 1 else densities
        # no rescale: "auto" where the drop rule brings none (TIES), else None
        options["rescale"] = "l1" if rescale else ("auto" if get_method(method).rescale is None else None)
    if get_method(method).drop in COUNT_RULES:
        options["count_rounding"] = "floor"   # mergekit's trim keeps int(d·n) entries of each tensor
    options["out_dtype"] = _out_dtype(doc)
    for key, (default, methods) in KNOBS.items():
        if method in methods:  # mergekit's per-model knob: one value for every model here
            values = {_number(p.get(key, default), f"model {e['model']!r}: {key}") for p, e in zip(per_model, models)}
            if len(values) != 1:
                raise NotRepresentable(f"{method}: one {key} for every model, got {sorted(values)}")
            options[key] = values.pop()
    for w in weights:
        if not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers, got {weights}")
    config = MergeConfig.build(method, len(models), **options)
    return config, str(base), [str(e["model"]) for e in models], doc.get("dtype")
