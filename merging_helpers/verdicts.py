"""The papers' claims, each tied to the numbers a chapter measured, and the rule that reads its verdict.

Introduced in chapter 8. A :class:`Claim` names the paper and its claim, the chapter
that re-measured it and the *glued* values that hold our difference and its 95 %
interval (:mod:`merging_helpers.results` keeps every chapter's glued values on disk).
:func:`verdict` turns those numbers into "holds", "does not hold" or "inconclusive" by a
rule stated in the claim (``test``), so no verdict in the book is typed by hand:

* ``above``  – the claim says ours > 0: holds when the interval lies above 0, does not
  hold when it lies below, inconclusive when it contains 0;
* ``below``  – the mirror image (the claim says ours < 0);
* ``within`` – the claim says "about the same": holds when the interval lies inside
  ±``margin``, does not hold when it lies wholly outside, inconclusive otherwise;
* ``at_least`` – a single number with no interval (a deterministic method): holds when
  ours ≥ ``margin``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

TESTS = ("above", "below", "within", "at_least")
HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and where the book measured it (chapter 8)."""

    source: str             # "APL, Table 1"
    claim: str              # the claim in words
    chapter: str            # the notebook that measured it, e.g. "04b_apl_merging"
    ours: str               # glued value: our number (accuracy points unless `unit` says otherwise)
    low: str | None = None  # glued values: the ends of its 95 % interval
    high: str | None = None
    paper: float | str | None = None  # the paper's number, or a glued value of the chapter ("glue:<name>")
    test: str = "above"
    margin: float = 0.0
    unit: str = "points"

    def __post_init__(self):
        if self.test not in TESTS:
            raise ValueError(f"claim {self.claim!r}: test must be one of {TESTS}, got {self.test!r}")
        if (self.low is None) != (self.high is None) or (self.test != "at_least" and self.low is None):
            raise ValueError(f"claim {self.claim!r}: a {self.test!r} test needs both ends of an interval")

    @property
    def keys(self) -> tuple[str, ...]:
        """Every glued value the claim reads."""
        paper = (self.paper[5:],) if isinstance(self.paper, str) and self.paper.startswith("glue:") else ()
        return tuple(k for k in (self.ours, self.low, self.high) if k is not None) + paper


CLAIMS: tuple[Claim, ...] = (
    Claim("APL, Fig. 3", "APL prunes better than DARE at drop ratios ≥ 0.95 (here at the highest ratio)",
          "04_apl", "fig3_diff_995", "fig3_low_995", "fig3_high_995", paper="APL above (figure only)"),
    Claim("APL, Fig. 6", "similar tasks use similar layers: r(news, sentiment) − r(news, compare) of the layer "
          "profiles", "04_apl", "fig6_diff", "fig6_low", "fig6_high", paper="similar above (figure only)", unit="r"),
    Claim("APL, Table 1", "MI-Task Arithmetic beats Task Arithmetic", "04b_apl_merging",
          "t1_weights_diff", "t1_weights_low", "t1_weights_high", paper=75.57 - 70.15),
    Claim("APL, Table 1", "APL beats DARE inside Task Arithmetic", "04b_apl_merging",
          "t1_ta_diff", "t1_ta_low", "t1_ta_high", paper=70.63 - 70.42),
    Claim("APL, Table 1", "APL beats DARE inside MI-Task Arithmetic", "04b_apl_merging",
          "t1_mi_diff", "t1_mi_low", "t1_mi_high", paper=76.25 - 75.71),
    Claim("APL, Table 1", "APL beats DARE inside Task Arithmetic at DARE's budget (rates shifted to its kept count)",
          "04b_apl_merging", "t1_matched_ta_diff", "t1_matched_ta_low", "t1_matched_ta_high", paper=70.63 - 70.42),
    Claim("APL, Table 1", "APL beats DARE inside MI-Task Arithmetic at DARE's budget (rates shifted to its kept count)",
          "04b_apl_merging", "t1_matched_mi_diff", "t1_matched_mi_low", "t1_matched_mi_high", paper=76.25 - 75.71),
    Claim("APL, Table 4", "the gradient approximation is close to causal APL (layer level, ±1 point)",
          "05b_gradient_table4", "t4_layer_diff", "t4_layer_low", "t4_layer_high", paper="glue:t4_layer_paper",
          test="within", margin=1.0),
    Claim("APL, Table 4", "the gradient approximation is close to causal APL (hidden-state level, ±1 point)",
          "05b_gradient_table4", "t4_hidden_diff", "t4_hidden_low", "t4_hidden_high",
          paper="glue:t4_hidden_paper", test="within", margin=1.0),
    Claim("APL, Fig. 4", "layer-level importance beats model level (plain DARE)", "04b_apl_merging",
          "f4_layer_model_diff", "f4_layer_model_low", "f4_layer_model_high", paper="above (figure only)"),
    Claim("APL, Fig. 4", "hidden-state level beats layer level", "04b_apl_merging",
          "f4_hidden_layer_diff", "f4_hidden_layer_low", "f4_hidden_layer_high", paper="above (figure only)"),
    Claim("APL, Fig. 5", "more shots give better importances (APL at 20 shots − at 1 shot)", "04b_apl_merging",
          "f5_more_diff", "f5_more_low", "f5_more_high", paper="rising (figure only)"),
    Claim("APL, Table 2", "APL beats DARE out of domain", "04b_apl_merging",
          "t2_apl_dare_diff", "t2_apl_dare_low", "t2_apl_dare_high", paper=48.88 - 48.58),
    Claim("DPPA, Table 1", "DPPA at 0.9 is within 2 points of the best other method at 0.1 (heavy tier, "
          "Domain-Ratio)", "06_dppa", "heavy_dppa09_gap", paper="≈ 0", test="at_least", margin=-2.0),
    Claim("DPPA, Limitations", "DPPA is weaker than DARE on light fine-tunes (light tier, drop 0.9, "
          "Domain-Ratio)", "06_dppa", "light_vs_dare", "light_vs_dare_low", "light_vs_dare_high",
          paper="below (no number)", test="below"),
    Claim("DPPA, Table 3", "DPA's band-wise reduction improves DARE at a pruning rate of 0.9 (heavy tier, mean "
          "Domain-Ratio)", "06_dppa", "t3_heavy_diff", "t3_heavy_low", "t3_heavy_high", paper="glue:t3_paper_diff"),
    Claim("RMS slides", "RMS-adaptive rates beat DARE+TIES (full fine-tunes, mean over groups and rates)",
          "07_rms_adaptive", "gain_full", "gain_full_low", "gain_full_high", paper="glue:gain_slides"),
    Claim("RMS slides", "an expert's RMS correlates with its merge gain (pooled Pearson r, full fine-tunes)",
          "07_rms_adaptive", "pcc_full_r", "pcc_full_low", "pcc_full_high", paper="+0.85 to +0.90", unit="r"),
    Claim("APL, Table 5", "with two similar tasks, Task Arithmetic stays within 1 point of the fine-tuned experts "
          "(news + sentiment, kept 0.2 setting)", "08_side_by_side", "t5_similar_diff", "t5_similar_low",
          "t5_similar_high", paper=(94.17 + 96.33) / 2 - (94.42 + 95.53) / 2, test="within", margin=1.0),
    Claim("APL, Table 5", "with two dissimilar tasks, Task Arithmetic stays within 1 point of the fine-tuned "
          "experts (news + compare)", "08_side_by_side", "t5_dissimilar_diff", "t5_dissimilar_low",
          "t5_dissimilar_high", paper=(94.24 + 76.32) / 2 - (94.42 + 75.45) / 2, test="within", margin=1.0),
)


def verdict(claim: Claim, values: Mapping[str, object]) -> str:
    """"holds", "does not hold" or "inconclusive": ``claim``'s rule applied to ``values``
    (a chapter's glued values, by name) (chapter 8)."""
    missing = [k for k in (claim.ours, claim.low, claim.high) if k is not None and k not in values]
    if missing:
        raise KeyError(f"{claim.chapter} has no glued value(s) {missing} for the claim {claim.claim!r}")
    ours = float(values[claim.ours])
    if claim.test == "at_least":
        return HOLDS if ours >= claim.margin else FAILS
    low, high = float(values[claim.low]), float(values[claim.high])
    if any(math.isnan(x) for x in (ours, low, high)):
        return OPEN
    if claim.test == "below":
        low, high = -high, -low
    if claim.test == "within":
        if -claim.margin <= low and high <= claim.margin:
            return HOLDS
        return FAILS if high < -claim.margin or low > claim.margin else OPEN
    return HOLDS if low > 0 else FAILS if high < 0 else OPEN


def paper_value(claim: Claim, values: Mapping[str, object]):
    """The paper's number of ``claim`` (read from the chapter when it glued it) (chapter 8)."""
    if isinstance(claim.paper, str) and claim.paper.startswith("glue:"):
        return values[claim.paper[5:]]
    return claim.paper


Z95, Z80 = 1.959964, 0.841621  # two-sided 95 % and one-sided 80 % normal quantiles


def _normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def p_value(claim: Claim, ours: float, low: float, high: float, plain: str) -> float:
    """The p-value behind ``plain``, the claim's verdict, reading its 95 % interval as normal
    (se = width / 2·1.96) (chapter 8): two-sided against no difference for the above/below
    rules; for "within", the larger one-sided p of the equivalence test (TOST) when it holds,
    the one-sided p of lying beyond the margin when it does not; 1 when inconclusive."""
    se = (high - low) / (2 * Z95)
    if plain == OPEN or not se > 0:
        return 1.0
    if claim.test != "within":
        return min(1.0, 2 * _normal_tail(abs(ours) / se))
    if plain == HOLDS:
        return max(_normal_tail((ours + claim.margin) / se), _normal_tail((claim.margin - ours) / se))
    return _normal_tail((abs(ours) - claim.margin) / se)


def holm(p_values, alpha: float = 0.05) -> list[bool]:
    """Holm's step-down over a family of p-values: which are rejected at family-wise level ``alpha`` (chapter 8)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def verdict_table(records: Mapping[str, Mapping], claims=CLAIMS):
    """One row per claim: paper, ours, interval, verdict, and the record it came from (chapter 8).

    Beside the plain verdict (each claim at 95 %): the Holm-adjusted verdict over every claim with
    an interval (a verdict stands only if its p-value survives Holm's step-down at a family-wise
    5 %), and the smallest true difference the experiment would detect with 80 % power,
    (1.96 + 0.84)·se — so that "inconclusive" reads as "no effect larger than that".
    ``records``: chapter → record (:func:`merging_helpers.results.load`)."""
    import pandas as pd
    rows = []
    for claim in claims:
        record = records[claim.chapter]
        values = record["values"]
        low = float(values[claim.low]) if claim.low else float("nan")
        high = float(values[claim.high]) if claim.high else float("nan")
        ours, plain = float(values[claim.ours]), verdict(claim, values)
        interval = claim.low is not None and not math.isnan(low + high + ours)
        rows.append({"source": claim.source, "claim": claim.claim, "paper": paper_value(claim, values),
                     "ours": ours, "95% CI low": low, "95% CI high": high, "unit": claim.unit, "verdict": plain,
                     "p": p_value(claim, ours, low, high, plain) if interval else float("nan"),
                     "detectable (80 % power)": (Z95 + Z80) * (high - low) / (2 * Z95) if interval else float("nan"),
                     "measured in": f"{claim.chapter} ({record['mode']}, {record['written'][:10]})"})
    table = pd.DataFrame(rows)
    family = table["p"].notna()
    survives = dict(zip(table.index[family], holm(table.loc[family, "p"].tolist())))
    table["verdict (Holm)"] = [v if not family[i] else (v if survives[i] else OPEN) for i, v in table["verdict"].items()]
    return table
