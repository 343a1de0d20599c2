"""benchmarks/compute_table.py: the compute table is read from pytest's durations, never typed."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compute_table", ROOT / "benchmarks" / "compute_table.py")
compute_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compute_table)

LOG = """============================= slowest durations =============================
612.31s call     tests/test_chapters_alone.py::test_the_chapter_runs_alone_from_the_installed_package[08_side_by_side]
45.02s call     tests/test_chapters_alone.py::test_the_chapter_runs_alone_from_the_installed_package[00_model_zoo]
30.00s call     tests/test_zoo.py::test_same_seed_same_weights
0.50s setup    tests/test_chapters_alone.py::test_the_chapter_runs_alone_from_the_installed_package[01_delta_parameters]
"""


def test_durations_are_read_for_the_chapter_calls_only():
    assert compute_table.chapter_durations(LOG) == {"08_side_by_side": 612.31, "00_model_zoo": 45.02}


def test_the_table_says_unmeasured_where_nothing_was_measured():
    data = {"columns": {"quick, cold": {"seconds": {"00_model_zoo": 90.0, "08_side_by_side": 600.0}, "note": "n"}}}
    text = compute_table.table(data)
    assert "| 00_model_zoo | 1.5 | unmeasured | unmeasured | unmeasured | unmeasured |" in text
    assert "| **all chapters** | **11.5** |" in text


def test_the_pages_carry_the_table_markers_and_the_stored_times():
    for page in compute_table.TARGETS:
        text = page.read_text()
        assert compute_table.START in text and compute_table.END in text, page
    if compute_table.TIMES.exists():  # what the pages show is what was measured
        table = compute_table.table(json.loads(compute_table.TIMES.read_text()))
        for page in compute_table.TARGETS:
            assert table in page.read_text(), f"{page.name}: run `python benchmarks/compute_table.py render`"


def test_full_columns_are_read_from_the_records_a_build_wrote(tmp_path):
    for chapter, seconds in {"04_apl": 301.5, "08_side_by_side": 900.0}.items():
        (tmp_path / f"{chapter}.full.json").write_text(json.dumps({"chapter": chapter, "seconds": seconds}))
    (tmp_path / "04_apl.quick.json").write_text(json.dumps({"chapter": "04_apl", "seconds": 1.0}))
    assert compute_table.record_durations(tmp_path) == {"04_apl": 301.5, "08_side_by_side": 900.0}
    assert compute_table.record_durations(tmp_path, "quick") == {"04_apl": 1.0}


def test_only_stores_the_named_chapters_and_keeps_the_columns_other_times(tmp_path, monkeypatch):
    monkeypatch.setattr(compute_table, "TIMES", tmp_path / "times.json")
    compute_table.TIMES.write_text(json.dumps({"columns": {"full, cold": {"seconds": {"04_apl": 60.0, "08b_x": 1.0},
                                                                           "note": "first run"}}}))
    for chapter, seconds in {"04_apl": 999.0, "08b_x": 120.0}.items():
        (tmp_path / f"{chapter}.full.json").write_text(json.dumps({"chapter": chapter, "seconds": seconds}))
    data = compute_table.record(tmp_path, "full, cold", "alone", from_records=True, only=["08b_x"])
    column = data["columns"]["full, cold"]
    assert column["seconds"] == {"04_apl": 60.0, "08b_x": 120.0}
    assert compute_table.column_note(column) == "first run; 08b_x: alone"
    data = compute_table.record(tmp_path, "full, cold", "again", from_records=True, only=["08b_x", "04_apl"])
    column = data["columns"]["full, cold"]
    assert column["seconds"] == {"04_apl": 999.0, "08b_x": 120.0}
    # the earlier note of 08b_x is gone, and the first run's: it times no chapter of the column any more
    assert compute_table.column_note(column) == "08b_x, 04_apl: again"
    data = compute_table.record(tmp_path, "full, cold", "third", from_records=True, only=["04_apl"])
    assert compute_table.column_note(data["columns"]["full, cold"]) == "08b_x: again; 04_apl: third"
    with pytest.raises(SystemExit, match="no times of"):
        compute_table.record(tmp_path, "full, cold", "n", from_records=True, only=["09_y"])
