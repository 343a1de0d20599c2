"""Merge methods as data: each method is one small record of its steps.

Introduced in chapters 2–3. A merge method, in the book (and in mergekit), is
*sparsify → rescale → combine*: drop entries of every expert's delta, rescale the
survivors, then either add the deltas up or elect a sign per entry and merge only the
agreeing deltas. :class:`Method` names those choices; :data:`METHODS` lists the
book's methods. The reference engine (:mod:`merging_helpers.recipes`), the streaming
merge and the compiled kernel's flags are all read from these records, so adding a
method is one entry here (plus a drop rule in ``drop`` or a combine rule in
``consensus`` if it brings a new one).

    method            drop (per expert)       its rescale      combine
    task_arithmetic   –                       –                Σ w_t Δ_t
    magnitude         top-k |Δ|               –                Σ w_t Δ̂_t
    dare_linear       Bernoulli(p)            1/(1−p)          Σ w_t Δ̂_t
    ties              top-k |Δ|               –                elect sign + disjoint merge
    dare_ties         Bernoulli(p)            1/(1−p)          elect sign + disjoint merge
    della             MagPrune (rank in row)  1/p_i            elect sign + disjoint merge
    breadcrumbs       top-k |Δ| minus top γ   –                Σ w_t Δ̂_t
    breadcrumbs_ties  top-k |Δ| minus top γ   –                elect sign + disjoint merge

How the disjoint merge divides depends on where the weights enter (chapter 3's
"peft vs mergekit" section): with the election on *unweighted* deltas it divides by
the number of agreeing experts; with the election on *weighted* deltas it divides by
the sum of their weights, or not at all (``Method.divide_when_weighted``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .consensus import DIVISORS

DROP_RULES = (None, "magnitude", "random", "magprune", "breadcrumbs")
COUNT_RULES = ("magnitude", "breadcrumbs")  # drop rules that keep a count of the largest |Δ| (count_rounding)
COMBINE_RULES = ("sum", "elect")
# the rescale each drop rule brings ("inverse": 1/(1 − p); "keep_prob": 1/p_i)
RULE_RESCALE = {None: None, "magnitude": None, "random": "inverse", "magprune": "keep_prob", "breadcrumbs": None}


@dataclass(frozen=True)
class Method:
    """One merge method (chapters 2–3): its drop rule, combine rule and divisor."""

    name: str
    chapter: int
    drop: str | None  # one of DROP_RULES
    combine: str  # one of COMBINE_RULES
    divide_when_weighted: str = "weight_sum"  # divisor of an election on weighted deltas
    mergekit: str | None = None  # mergekit's name for the same merge, where it has one (chapter 9)
    plan: str | None = None  # "module:function" of its plan, where its config needs the whole model (PLANNED)

    def __post_init__(self):
        if self.drop not in DROP_RULES:
            raise ValueError(f"Method {self.name!r}: drop must be one of {DROP_RULES}, got {self.drop!r}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"Method {self.name!r}: combine must be one of {COMBINE_RULES}, got {self.combine!r}")
        if self.divide_when_weighted not in DIVISORS:
            raise ValueError(f"Method {self.name!r}: divide_when_weighted must be one of {DIVISORS}")

    @property
    def rescale(self) -> str | None:
        """The drop rule's own rescale (what ``rescale="auto"`` means)."""
        return RULE_RESCALE[self.drop]

    @property
    def random(self) -> bool:
        """True where the drop draws random masks (a merge per seed)."""
        return self.drop in ("random", "magprune")

    @property
    def needs_rate(self) -> bool:
        return self.drop is not None

    @property
    def elects(self) -> bool:
        return self.combine == "elect"

    def divisor(self, weighted_election: bool) -> str:
        """What the disjoint merge divides by when no ``divide_by`` is given."""
        return self.divide_when_weighted if weighted_election else "count"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("task_arithmetic", 2, drop=None, combine="sum", mergekit="task_arithmetic"),
    Method("magnitude", 2, drop="magnitude", combine="sum"),
    Method("dare_linear", 2, drop="random", combine="sum", mergekit="dare_linear"),
    Method("ties", 3, drop="magnitude", combine="elect", mergekit="ties"),
    Method("dare_ties", 3, drop="random", combine="elect", divide_when_weighted="nothing", mergekit="dare_ties"),
    Method("della", 3, drop="magprune", combine="elect", mergekit="della"),
    Method("breadcrumbs", 3, drop="breadcrumbs", combine="sum", mergekit="breadcrumbs"),
    Method("breadcrumbs_ties", 3, drop="breadcrumbs", combine="elect", divide_when_weighted="nothing",
           mergekit="breadcrumbs_ties"),
)}


# Methods whose config depends on the whole model (statistics of its deltas, or importances per
# partition): each runs a *plan* first. ``plan(n_experts, options) -> (config, finish)`` checks the
# method's own options (``config`` can check the inputs before anything is read);
# ``finish(source) -> config`` reads a :class:`~merging_helpers.tensor_source.TensorSource` (state dicts
# in memory, or checkpoint folders) and returns the engine's config: both front doors run the same plan,
# and the streamed merge never names the method (chapters 4, 6, 7 and the appendix). The record's drop
# and combine say what the planned config runs; ``options`` are the plan's own option names.
PLANNED: dict[str, Method] = {m.name: m for m in (
    Method("apl", 4, drop="random", combine="sum", plan="merging_helpers.apl:plan"),
    Method("dp", 6, drop="magnitude", combine="sum", plan="merging_helpers.dppa:plan"),
    Method("rms_adaptive", 7, drop="random", combine="elect", divide_when_weighted="nothing",
           plan="merging_helpers.rms_adaptive:plan"),
)}
PLANS: dict[str, str] = {n: m.plan for n, m in PLANNED.items()}


def get_plan(name):
    """The plan function of method ``name``, or None where its config needs no whole-model pass (chapter 7)."""
    import importlib
    if not isinstance(name, str) or name not in PLANS:
        return None
    module, _, function = PLANS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def registry() -> dict[str, Method]:
    """Every method of the book, by name: the per-tensor records and the planned ones (chapters 3–7)."""
    return {**METHODS, **PLANNED}


def get_method(name) -> Method:
    """The record of method ``name`` (a ``Method`` passes through); a clear error otherwise (chapters 2–3)."""
    if isinstance(name, Method):
        return name
    known = registry()
    if not isinstance(name, str):
        raise TypeError(f"method must be a method's name, one of {sorted(known)}, got a {type(name).__name__}: "
                        f"{name!r}")
    if name not in known:
        raise ValueError(f"method must be one of {sorted(known)}, got {name!r}")
    return known[name]
