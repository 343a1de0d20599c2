"""The verdict rules on hand-worked cases, and every claim tied to values its chapter glues."""
import json
import re
from pathlib import Path

import pytest

from merging_helpers import verdicts
from merging_helpers.verdicts import CLAIMS, FAILS, HOLDS, OPEN, Claim, verdict, verdict_table

BOOK = Path(__file__).resolve().parent.parent / "book"


def _claim(test, margin=0.0, interval=True):
    return Claim("P", "c", "ch", "d", "lo" if interval else None, "hi" if interval else None, test=test, margin=margin)


@pytest.mark.parametrize("test, margin, d, lo, hi, expected", [
    ("above", 0, 1.0, 0.2, 1.8, HOLDS),
    ("above", 0, 0.5, -0.1, 1.1, OPEN),
    ("above", 0, -1.0, -1.5, -0.5, FAILS),
    ("above", 0, 0.0, 0.0, 0.0, OPEN),          # an interval that touches 0 shows nothing
    ("below", 0, -1.0, -1.5, -0.5, HOLDS),
    ("below", 0, 1.0, 0.5, 1.5, FAILS),
    ("below", 0, 0.1, -0.2, 0.4, OPEN),
    ("within", 1, -0.3, -0.9, 0.4, HOLDS),
    ("within", 1, -0.5, -1.2, 0.2, OPEN),
    ("within", 1, -2.0, -2.5, -1.5, FAILS),
    ("within", 1, 2.0, 1.5, 2.5, FAILS),
    ("above", 0, float("nan"), float("nan"), float("nan"), OPEN),
])
def test_interval_rules(test, margin, d, lo, hi, expected):
    assert verdict(_claim(test, margin), {"d": d, "lo": lo, "hi": hi}) == expected


def test_point_rule():
    claim = _claim("at_least", -2.0, interval=False)
    assert verdict(claim, {"d": -1.9}) == HOLDS
    assert verdict(claim, {"d": -2.1}) == FAILS


def test_a_claim_needs_its_interval_and_a_known_rule():
    with pytest.raises(ValueError, match="needs both ends"):
        Claim("P", "c", "ch", "d", test="above")
    with pytest.raises(ValueError, match="test must be one of"):
        Claim("P", "c", "ch", "d", "lo", "hi", test="bigger")


def test_a_missing_value_names_the_chapter_and_the_key():
    with pytest.raises(KeyError, match=r"04_apl has no glued value\(s\) \['fig3_low_995'"):
        verdict(CLAIMS[0], {"fig3_diff_995": 1.0, "fig3_high_995": 2.0})


def _glue_patterns(chapter: str):
    """Every key the chapter's code glues, as a regex (an f-string's fields match any word)."""
    cells = json.loads((BOOK / f"{chapter}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    names = re.findall(r"""glue\(\s*f?["']([^"']+)["']""", code)
    return [re.compile(re.sub(r"\\\{[^}]*\\\}", r"\\w+", re.escape(n)) + "$") for n in names]


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{c.chapter}:{c.ours}" for c in CLAIMS])
def test_every_claim_reads_values_its_chapter_glues(claim):
    assert (BOOK / f"{claim.chapter}.ipynb").exists(), f"{claim.chapter}: no such chapter"
    patterns = _glue_patterns(claim.chapter)
    missing = [k for k in claim.keys if not any(p.match(k) for p in patterns)]
    assert not missing, f"{claim.chapter} glues no {missing} (claim: {claim.claim})"


def test_the_glue_check_catches_a_typo():
    good = Claim("P", "c", "04_apl", "fig3_diff_995", "fig3_low_995", "fig3_high_995")
    typo = Claim("P", "c", "04_apl", "fig3_diff_995", "fig3_low_995", "fig3_high_959")
    patterns = _glue_patterns("04_apl")
    assert all(any(p.match(k) for p in patterns) for k in good.keys)
    assert not any(p.match("fig3_high_959") for p in patterns)
    assert any(p.match("t1_ta_diff") for p in _glue_patterns("04b_apl_merging"))  # f-string keys
    assert not any(p.match("t1_ta_dif") for p in _glue_patterns("04b_apl_merging"))
    del typo


def test_the_table_reads_each_verdict_from_the_records():
    record = {"mode": "quick", "written": "2026-11-30T00:00:00+00:00"}
    claims = (Claim("P", "up", "a", "d", "lo", "hi", paper=1.0),
              Claim("P", "close", "b", "d", "lo", "hi", paper="glue:p", test="within", margin=1.0))
    records = {"a": {**record, "values": {"d": 1.0, "lo": 0.5, "hi": 1.5}},
               "b": {**record, "values": {"d": 0.0, "lo": -2.0, "hi": 0.5, "p": -0.4}}}
    table = verdict_table(records, claims)
    assert table["verdict"].tolist() == [HOLDS, OPEN]
    assert table["paper"].tolist() == [1.0, -0.4]
    assert table["measured in"].tolist() == ["a (quick, 2026-11-30)", "b (quick, 2026-11-30)"]
    records["a"]["values"]["lo"] = -0.5  # the same table, another measurement: another verdict
    assert verdict_table(records, claims)["verdict"].tolist() == [OPEN, OPEN]


def test_every_claim_of_the_issue_has_a_row():
    sources = {c.source for c in verdicts.CLAIMS}
    assert sources >= {"APL, Fig. 3", "APL, Table 1", "APL, Table 4", "APL, Fig. 4", "APL, Fig. 5",
                       "APL, Table 2", "APL, Table 5", "DPPA, Table 1", "DPPA, Table 3", "DPPA, Limitations", "RMS slides"}


def test_holm_by_hand():
    # m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05 in p order; the third smallest (0.03) fails, so the rest stop
    assert verdicts.holm([0.01, 0.2, 0.015, 0.03]) == [True, False, True, False]
    assert verdicts.holm([0.04, 0.04]) == [False, False]  # each would pass alone at 5 %, not both under Holm
    assert verdicts.holm([0.02, 0.001]) == [True, True]


def test_the_holm_column_and_the_detectable_effect():
    record = {"mode": "full", "written": "2026-12-04T00:00:00+00:00"}
    claims = tuple(Claim("P", f"c{i}", "a", f"d{i}", f"lo{i}", f"hi{i}") for i in range(3))
    # intervals of half-width 1.96 (se 1): z = 2.2, 2.1 (each p < 0.05) and 5 (p ≈ 6e-7)
    values = {}
    for i, d in enumerate((2.2, 2.1, 5.0)):
        values |= {f"d{i}": d, f"lo{i}": d - 1.959964, f"hi{i}": d + 1.959964}
    table = verdict_table({"a": {**record, "values": values}}, claims)
    assert table["verdict"].tolist() == [HOLDS, HOLDS, HOLDS]
    assert table["p"].tolist() == pytest.approx([0.0278, 0.0357, 5.7e-7], rel=1e-2)
    # Holm: 5.7e-7 ≤ 0.05/3 passes, 0.0278 > 0.05/2 stops: only the strongest claim stands
    assert table["verdict (Holm)"].tolist() == [OPEN, OPEN, HOLDS]
    assert table["detectable (80 % power)"].tolist() == pytest.approx([2.8016] * 3, rel=1e-4)


def test_an_equivalence_claim_gets_the_tost_p_value():
    claim = Claim("P", "close", "a", "d", "lo", "hi", test="within", margin=1.0)
    # d = 0, se = 0.25: both one-sided tests at z = 4 → p = Φ(−4)
    assert verdicts.p_value(claim, 0.0, -0.49, 0.49, HOLDS) == pytest.approx(3.17e-5, rel=2e-2)
    assert verdicts.p_value(claim, 0.0, -3.0, 3.0, OPEN) == 1.0
