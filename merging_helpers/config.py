"""One merge configuration, validated once before any work.

Introduced in chapters 2–3. :class:`MergeConfig` holds every option of a merge; the
in-memory merge (:func:`merging_helpers.recipes.merge_state_dicts`) and the streaming
merge (:func:`merging_helpers.fast.streaming.merge_folders`) take the same config, or
the same keyword arguments, which they turn into one with :meth:`MergeConfig.build`.
Every check (types, ranges, per-expert lists, per-partition keys that match no tensor,
missing rates, per-row vectors of the wrong length) happens there and in
:meth:`MergeConfig.check_tensors`, before a single tensor is merged.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .consensus import ELECTIONS
from .methods import COUNT_RULES, DIVISORS, Method, get_method, get_plan
from .partitions import (LEVELS, Floored, PerColumn, PerRow, check_rate_fits, complement, levels_matching, rate_for,
                         unused_rate_keys, validate_rates)
from .rescale import RESCALES

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the merge runs in float32
SCOPES = ("tensor", "model")
ROUNDINGS = ("round", "floor")
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _per_expert(rates, n_experts: int, what: str) -> list:
    """A list of one rate spec per expert (a single spec is shared)."""
    if isinstance(rates, (list, tuple)):
        if len(rates) != n_experts:
            raise ValueError(f"{what}: got a list of {len(rates)} rates for {n_experts} experts")
        return list(rates)
    return [rates] * n_experts


@dataclass(frozen=True)
class MergeConfig:
    """Every option of a merge (chapters 2–3); build it with :meth:`build`, which validates.

    Rates (``density`` = kept fraction, or ``drop_rate`` = 1 − density, and
    ``rescale_factor``): a float, a ``{partition key at rate_level: rate}`` mapping whose
    values may be :class:`~merging_helpers.partitions.PerRow` / ``PerColumn`` vectors, or
    (density / drop_rate) a list of those, one per expert.
    """

    method: Method
    n_experts: int
    density: object = None
    drop_rate: object = None
    weights: tuple | None = None
    lam: float = 1.0
    seed: int = 0
    rescale: str | None = "auto"
    rescale_factor: object = None
    election: str = "total"
    weighted_election: bool = False
    divide_by: str | None = None
    epsilon: float = 0.0
    gamma: float | None = None      # breadcrumbs: the fraction of largest |Δ| dropped as outliers
                                    # (None: drop.BREADCRUMBS_GAMMA)
    rate_level: str = "layer_role"
    rate_default: float | None = None
    magnitude_scope: str = "tensor"
    count_rounding: str = "round"   # a magnitude trim keeps round(d·n) entries, or "floor": int(d·n) (mergekit)
    out_dtype: str | None = None    # the merged floating tensors' dtype (mergekit's out_dtype); None: the input's
    thresholds: tuple | None = field(default=None, repr=False)  # per expert |Δ| thresholds (whole-model scope)

    # ---- building and validating ------------------------------------------------------

    @classmethod
    def build(cls, method, n_experts: int, **options) -> "MergeConfig":
        """Validate ``options`` for a merge of ``n_experts`` experts and return the config;
        unknown options are refused."""
        allowed = {f.name for f in dataclasses.fields(cls)} - {"method", "n_experts"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"unknown merge option(s) {unknown}; the options are {sorted(allowed)}")
        if not (isinstance(n_experts, int) and n_experts >= 1):
            raise ValueError(f"a merge needs at least one expert, got {n_experts!r}")
        record = get_method(method)
        if record.plan:
            raise ValueError(f"method {record.name!r} builds its config from the whole model (a plan): "
                             "give its own options to merge_state_dicts or merge_folders, not a MergeConfig")
        weights = options.get("weights")
        if weights is not None:
            options["weights"] = cls._checked_weights(weights, n_experts)
        for what in ("density", "drop_rate", "rescale_factor"):  # a copy: later edits of the caller's dicts
            if options.get(what) is not None:                     # cannot bypass the checks below
                options[what] = _copied(options[what])
        config = cls(record, n_experts, **options)
        config._validate()
        return config

    @staticmethod
    def _checked_weights(weights, n_experts) -> tuple:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1:
                raise ValueError(f"weights: expected a 1-D tensor of {n_experts} weights, got shape {tuple(weights.shape)}")
            weights = weights.tolist()
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a list of {n_experts} numbers (one per expert), got {weights!r}")
        if len(weights) != n_experts:
            raise ValueError(f"weights: expected one weight per expert ({n_experts}), got {len(weights)}")
        for t, w in enumerate(weights):
            if not _is_real(w):
                raise TypeError(f"weights[{t}] must be a number, got {w!r}")
            if not math.isfinite(w):
                raise ValueError(f"weights[{t}] must be finite, got {w}")
        return tuple(float(w) for w in weights)

    def _validate(self) -> None:
        m = self.method
        if self.density is not None and self.drop_rate is not None:
            raise ValueError("give either density or drop_rate (= 1 − density), not both")
        if m.needs_rate and self.density is None and self.drop_rate is None:
            raise ValueError(f"method {m.name!r} needs density or drop_rate")
        if not m.needs_rate and (self.density is not None or self.drop_rate is not None):
            raise ValueError(f"method {m.name!r} drops nothing: density / drop_rate do not apply "
                             "(use 'magnitude' or 'dare_linear' to drop)")
        for what in ("density", "drop_rate"):
            rates = getattr(self, what)
            if rates is not None:
                for r in _per_expert(rates, self.n_experts, what):
                    validate_rates(r, what)
        if self.rate_default is not None:
            validate_rates(self.rate_default, "density" if self.density is not None else "drop_rate")
        if not _is_real(self.lam) or not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")
        if abs(self.lam) > FLOAT32_MAX:  # the merge runs in float32, where this λ would be inf
            raise ValueError(f"lam = {self.lam!r} is beyond float32's range (±{FLOAT32_MAX:.3g}), in which the merge "
                             "runs: every merged entry would be inf or NaN")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.rescale not in RESCALES + ("auto",):
            raise ValueError(f"rescale must be one of {RESCALES + ('auto',)}, got {self.rescale!r}")
        if (self.rescale == "factor") != (self.rescale_factor is not None):
            raise ValueError("rescale='factor' and rescale_factor go together (a float or a per-partition dict)")
        if self.rescale_factor is not None:
            validate_rates(self.rescale_factor, "factor")
        if self.rescale == "smallest" and m.drop != "random":
            raise ValueError(f"rescale='smallest' rescales a random drop (DARE) by its smallest rate; "
                             f"method {m.name!r} does not drop at random")
        if self.rescale == "keep_prob" and m.drop != "magprune":
            raise ValueError(f"rescale='keep_prob' needs per-entry keep probabilities (della), not {m.name!r}")
        if self.election not in ELECTIONS:
            raise ValueError(f"election must be one of {ELECTIONS}, got {self.election!r}")
        if not isinstance(self.weighted_election, bool):
            raise TypeError(f"weighted_election must be True or False, got {self.weighted_election!r}")
        if self.divide_by not in DIVISORS + (None,):
            raise ValueError(f"divide_by must be one of {DIVISORS}, got {self.divide_by!r}")
        if not _is_real(self.epsilon) or not self.epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        if self.epsilon and m.drop != "magprune":
            raise ValueError(f"epsilon is della's MagPrune spread; method {m.name!r} does not use it")
        if self.epsilon and m.drop == "magprune":
            self._check_magprune_band()
        if self.gamma is not None and (m.drop != "breadcrumbs" or not _is_real(self.gamma) or not 0 <= self.gamma < 1):
            raise ValueError(f"gamma is breadcrumbs' outlier fraction, a number in [0, 1); got {self.gamma!r} for "
                             f"method {m.name!r}")
        if self.rate_level not in LEVELS:
            raise ValueError(f"rate_level must be one of {LEVELS}, got {self.rate_level!r}")
        if self.magnitude_scope not in SCOPES:
            raise ValueError(f"magnitude_scope must be 'tensor' or 'model', got {self.magnitude_scope!r}")
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {tuple(OUT_DTYPES)} or None (each tensor's own dtype), "
                             f"got {self.out_dtype!r}")
        if self.count_rounding not in ROUNDINGS:
            raise ValueError(f"count_rounding must be one of {ROUNDINGS}, got {self.count_rounding!r}")
        if self.count_rounding == "floor" and (m.drop not in COUNT_RULES or self.magnitude_scope == "model"):
            raise ValueError("count_rounding='floor' rounds the kept count of a per-tensor magnitude trim ('magnitude', "
                             f"'ties', 'breadcrumbs', 'breadcrumbs_ties'); method {m.name!r} with "
                             f"magnitude_scope={self.magnitude_scope!r} keeps no count")
        if self.thresholds is not None:
            t = self.thresholds
            if not isinstance(t, (list, tuple)) or len(t) != self.n_experts or not all(
                    _is_real(x) and math.isfinite(x) and x >= 0 for x in t):
                raise ValueError(f"thresholds must be one |Δ| threshold (a number >= 0) per expert, "
                                 f"{self.n_experts} in all, got {t!r}")
        if self.magnitude_scope == "model":
            if m.drop != "magnitude":
                raise ValueError(f"magnitude_scope='model' applies to 'magnitude' and 'ties', not {m.name!r}")
            if self.thresholds is not None:
                raise ValueError("give magnitude_scope='model' or thresholds, not both")
            rates = self.density if self.density is not None else self.drop_rate
            if any(not _is_real(r) for r in _per_expert(rates, self.n_experts, "density")):
                raise ValueError("magnitude_scope='model' needs a float density per expert, not per-partition rates")

    def _check_magprune_band(self) -> None:
        """MagPrune's keep probabilities run from density − ε to density + ε: every given density
        must leave room for ε on both sides (checked here, before any work, for plain and
        per-partition densities; per-row vectors are checked when their tensor is merged)."""
        rates = self.density if self.density is not None else self.drop_rate
        for r in _per_expert(rates, self.n_experts, "density"):
            values = list(r.values()) if isinstance(r, Mapping) else [r]
            for v in values:
                if not _is_real(v):
                    continue
                d = v if self.density is not None else 1.0 - v
                if not (d - self.epsilon > 0 and d + self.epsilon <= 1):
                    raise ValueError(f"della: epsilon = {self.epsilon:g} does not fit density {d:g}: MagPrune keeps "
                                     "entries with probabilities from density − ε to density + ε, which must lie in "
                                     f"(0, 1]: at density {d:g}, epsilon must be < {d:g} and <= {1 - d:g}")

    def check_tensors(self, shapes: Mapping[str, tuple]) -> None:
        """Check the rates against the floating tensors ``{name: shape}`` of the model:
        every key matches a tensor, every tensor finds its rate, every per-row / per-column
        vector has the tensor's length. Raises before any work."""
        names = list(shapes)
        for what in ("density", "drop_rate", "rescale_factor"):
            rates = getattr(self, what)
            for r in _per_expert(rates, self.n_experts, what):
                bad = unused_rate_keys(names, r, self.rate_level)
                if bad:
                    other = [lv for lv in levels_matching(names, bad) if lv != self.rate_level]
                    hint = f"; they are {other[0]!r} keys: set rate_level={other[0]!r}" if other else ""
                    raise ValueError(f"{what}: keys {bad} match no tensor at rate_level {self.rate_level!r}{hint}")
        for name, shape in shapes.items():
            self.check_fits(name, shape)

    def check_fits(self, name: str, shape) -> None:
        """Tensor ``name`` finds its rate, and its per-row / per-column vectors fit ``shape``."""
        for rate in self.densities(name):
            check_rate_fits(name, shape, rate, "density" if self.density is not None else "drop_rate")
        check_rate_fits(name, shape, self.factor(name), "rescale_factor")

    # ---- what one tensor gets ---------------------------------------------------------------

    def densities(self, name: str) -> list:
        """Per expert: the kept fraction of tensor ``name`` (a float, or a PerRow / PerColumn)."""
        if self.density is None and self.drop_rate is None:
            return [1.0] * self.n_experts
        given = self.density if self.density is not None else self.drop_rate
        values = [rate_for(name, r, self.rate_level, self.rate_default)
                  for r in _per_expert(given, self.n_experts, "rates")]
        values = values if self.density is not None else [complement(p) for p in values]
        if self.count_rounding == "floor":
            if any(isinstance(v, (PerRow, PerColumn)) for v in values):
                raise ValueError(f"{name!r}: count_rounding='floor' takes one density per tensor, not per-row or "
                                 "per-column densities")
            values = [Floored(v) for v in values]
        return values

    def factor(self, name: str):
        """The ``rescale_factor`` of tensor ``name`` (None without one)."""
        return None if self.rescale_factor is None else rate_for(name, self.rescale_factor, self.rate_level, 1.0)

    def has_vector_rates(self) -> bool:
        """True if any rate is a per-row or per-column vector."""
        specs = [self.rescale_factor] + _per_expert(self.density if self.density is not None else self.drop_rate,
                                                    self.n_experts, "rates")
        return any(isinstance(v, (PerRow, PerColumn)) for s in specs
                   for v in (s.values() if isinstance(s, dict) else [s]))

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a merged tensor whose inputs are ``dtype`` is written in: ``out_dtype`` for
        floating tensors when given, else ``dtype`` (integer buffers are always copied as they are)."""
        return OUT_DTYPES[self.out_dtype] if self.out_dtype and dtype.is_floating_point else dtype

    @property
    def rescale_rule(self) -> str | None:
        """The rescale applied after the drop ("auto" resolved to the drop rule's own)."""
        if self.method.drop is None:
            return None
        return self.method.rescale if self.rescale == "auto" else self.rescale

    @property
    def divisor(self) -> str:
        """What the disjoint merge divides by (``divide_by``, else the method's default)."""
        return self.divide_by or self.method.divisor(self.weighted_election)

    def replace(self, **changes) -> "MergeConfig":
        return dataclasses.replace(self, **changes)


def _copied(rates):
    if isinstance(rates, (list, tuple)):
        return tuple(_copied(r) for r in rates)
    return dict(rates) if isinstance(rates, Mapping) else rates


def as_config(method, n_experts: int, config: MergeConfig | None = None, **options) -> MergeConfig:
    """``config`` itself (checked against ``n_experts``) or a config built from ``options`` (chapters 2–3)."""
    if config is None:
        return MergeConfig.build(method, n_experts, **options)
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a MergeConfig, got {type(config).__name__}")
    if options or (method is not None and get_method(method) != config.method):
        raise ValueError("give a MergeConfig or method + options, not both")
    if config.n_experts != n_experts:
        raise ValueError(f"the config is for {config.n_experts} experts, got {n_experts}")
    return config


def start_config(method, n_experts: int, config: MergeConfig | None = None, options: dict | None = None):
    """``(config, finish)`` for either front door (chapters 2–7): a planned method's plan
    (:data:`merging_helpers.methods.PLANNED`; ``finish(source)`` reads the model and returns the
    config to merge with), else :func:`as_config` and ``finish = None``. Every option is checked here,
    before anything is read."""
    plan = get_plan(method)
    if plan is None:
        return as_config(method, n_experts, config, **(options or {})), None
    if config is not None:
        raise ValueError(f"method {method!r} builds its config from the whole model (a plan): give its options, "
                         "not a config")
    return plan(n_experts, dict(options or {}))
