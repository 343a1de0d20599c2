"""Chapter records: what setup(chapter=...), glue and glue_run_time leave on disk for chapter 8."""
import json
import sys
import types

import nbformat
import numpy as np
import pytest

from merging_helpers import notebook, results


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGING_BOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(results, "_current", None)
    monkeypatch.setitem(sys.modules, "myst_nb", types.SimpleNamespace(glue=lambda *a, **k: None))
    return tmp_path


def test_a_chapter_leaves_every_glued_value_in_its_record(cache, monkeypatch, capsys):
    from IPython.display import Markdown
    monkeypatch.delenv("MERGING_BOOK_QUICK", raising=False)
    notebook.setup(quiet=True, chapter="04_apl")
    notebook.glue("diff", np.float64(1.25))
    notebook.glue("count", np.int64(3))
    notebook.glue("verdict", Markdown("holds"))
    notebook.glue("diff", 2.5)  # glued again: the last value counts
    notebook.glue_run_time()
    record = results.load("04_apl", "full")
    assert record["values"]["diff"] == 2.5 and record["values"]["count"] == 3
    assert record["values"]["verdict"] == "holds" and record["mode"] == "full"
    assert set(record["values"]) >= {"chapter_seconds", "chapter_cpus"}
    assert (cache / "results" / "04_apl.full.json").exists()
    assert not list((cache / "results").glob(".*"))  # no temporary file left behind


def test_quick_and_full_records_are_kept_apart(cache, monkeypatch):
    monkeypatch.setenv("MERGING_BOOK_QUICK", "1")
    notebook.setup(quiet=True, chapter="02_x")
    notebook.glue("a", 1)
    notebook.glue_run_time()
    assert results.load("02_x", "quick")["values"]["a"] == 1
    with pytest.raises(results.MissingResult, match="no full record of chapter 02_x"):
        results.load("02_x", "full")


def test_an_interrupted_chapter_leaves_the_last_complete_record(cache, monkeypatch):
    monkeypatch.delenv("MERGING_BOOK_QUICK", raising=False)
    notebook.setup(quiet=True, chapter="03_ties")
    notebook.glue("a", 1)
    notebook.glue_run_time()
    notebook.setup(quiet=True, chapter="03_ties")
    notebook.glue("a", 2)  # ... and the kernel dies before the last cell
    assert results.load("03_ties", "full")["values"]["a"] == 1


def test_the_running_chapter_reads_its_own_record_so_far(cache, monkeypatch):
    monkeypatch.setenv("MERGING_BOOK_QUICK", "1")
    with pytest.raises(results.MissingResult, match="no chapter record is open"):
        results.current()
    notebook.setup(quiet=True, chapter="08_x")
    notebook.glue("a", 1)
    now = results.current()
    notebook.glue("a", 2)
    assert now["values"] == {"a": 1} and now["mode"] == "quick" and now["chapter"] == "08_x"  # a copy
    assert not (cache / "results" / "08_x.quick.json").exists()  # nothing written before the last cell


def test_without_a_chapter_nothing_is_written(cache):
    notebook.setup(quiet=True)
    notebook.glue("a", 1)
    notebook.glue_run_time()
    assert not list((cache / "results").glob("*.json")) if (cache / "results").exists() else True


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden"])
def test_a_chapter_name_must_be_a_file_stem(cache, bad):
    with pytest.raises(ValueError, match="file stem"):
        results.start(bad, "full")


@pytest.mark.slow
def test_a_missing_record_is_recomputed_by_running_the_chapter(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("MERGING_BOOK_QUICK", raising=False)
    book = tmp_path / "book"
    book.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from merging_helpers.notebook import setup, glue, glue_run_time, quick_mode\n"
        "setup(quiet=True, chapter='09_tiny')\n"
        "glue('answer', 6 * 7 if not quick_mode() else -1)\n"
        "glue_run_time()")])
    nbformat.write(nb, book / "09_tiny.ipynb")
    records = results.load_or_run(["09_tiny"], "quick", book_dir=book, progress=False)
    assert records["09_tiny"]["values"]["answer"] == -1
    assert results.load_or_run(["09_tiny"], "full", book_dir=book, progress=False)["09_tiny"]["values"]["answer"] == 42
    with pytest.raises(results.MissingResult, match="10_absent.ipynb is not here"):
        results.run_chapter("10_absent", "full", book_dir=book)


def test_a_chapter_opened_alone_names_every_chapter_to_run_first(cache, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(results, "run_chapter", lambda *a, **k: ran.append(a))
    with pytest.raises(results.MissingResult, match=r"2 have not run here: 04_x, 07_y\. Run them first"):
        results.load_or_run(["04_x", "07_y"], "full", book_dir=tmp_path, progress=False)
    assert ran == []  # nothing ran before the error: it lists them all at once


def test_records_are_plain_json(cache, monkeypatch):
    import torch
    monkeypatch.delenv("MERGING_BOOK_QUICK", raising=False)
    results.start("01_x", "full")
    results.add("t", torch.tensor(0.5))
    results.add("pair", (np.float32(1.5), "x"))
    path = results.finish(1.0)
    assert json.loads(path.read_text())["values"] == {"t": 0.5, "pair": [1.5, "x"]}


def test_memo_computes_once_and_reads_back_what_json_keeps(cache, monkeypatch):
    monkeypatch.delenv("MERGING_BOOK_QUICK", raising=False)
    monkeypatch.delenv("MERGING_BOOK_FRESH", raising=False)
    calls = []

    def compute():
        calls.append(1)
        return {"rows": [(1, 2.5)], "none": None}

    cold = results.memo("06_x.grid", {"rate": 0.9}, compute)
    warm = results.memo("06_x.grid", {"rate": 0.9}, compute)
    assert cold == warm == {"rows": [[1, 2.5]], "none": None} and len(calls) == 1  # a tuple comes back a list
    results.memo("06_x.grid", {"rate": 0.8}, compute)                 # another key
    monkeypatch.setenv("MERGING_BOOK_QUICK", "1")
    results.memo("06_x.grid", {"rate": 0.9}, compute)                 # another mode
    monkeypatch.setenv("MERGING_BOOK_FRESH", "1")
    results.memo("06_x.grid", {"rate": 0.9}, compute)                 # asked to recompute
    assert len(calls) == 4
    assert len(list((cache / "results" / "memo").glob("06_x.grid-*.json"))) == 3
    assert not list((cache / "results" / "memo").glob(".*"))


def test_memo_recomputes_when_an_earlier_cell_changed(cache, monkeypatch):
    monkeypatch.delenv("MERGING_BOOK_FRESH", raising=False)
    cells = ["x = 1", "memo(...)"]
    monkeypatch.setattr(results, "_cells_so_far", lambda: list(cells))
    calls = []
    results.memo("g", {}, lambda: calls.append(1) or 1)
    results.memo("g", {}, lambda: calls.append(1) or 1)
    cells[0] = "x = 2"
    results.memo("g", {}, lambda: calls.append(1) or 1)
    assert len(calls) == 2


def test_memo_refuses_values_json_cannot_keep_and_odd_names(cache):
    with pytest.raises(TypeError, match="memo 'g': the value must be JSON"):
        results.memo("g", {}, lambda: {"t": object()})
    with pytest.raises(ValueError, match="name must be letters"):
        results.memo("../g", {}, lambda: 1)
    assert not list((cache / "results" / "memo").glob("*"))


def test_the_code_fingerprint_ignores_bookkeeping_but_not_methods(tmp_path):
    import shutil
    from pathlib import Path
    package = Path(results.__file__).parent
    for f in package.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    before = results.code_fingerprint(tmp_path)
    (tmp_path / "verdicts.py").write_text((tmp_path / "verdicts.py").read_text() + "\n# a new claim\n")
    assert results.code_fingerprint(tmp_path) == before
    (tmp_path / "dppa.py").write_text((tmp_path / "dppa.py").read_text() + "\n# a changed method\n")
    assert results.code_fingerprint(tmp_path) != before


def test_the_tally_counts_what_was_re_read_and_what_computing_it_costs(cache, monkeypatch):
    monkeypatch.delenv("MERGING_BOOK_FRESH", raising=False)
    notebook.setup(quiet=True, chapter="06_x")
    results.memo("g", {"k": 1}, lambda: 1)
    notebook.setup(quiet=True, chapter="06_x")  # a rebuild: the tally starts again
    results.memo("g", {"k": 1}, lambda: 1)
    results.memo("g", {"k": 2}, lambda: 2)
    tally = results.memo_tally()
    assert tally["read"] == 1 and tally["computed"] == 1 and tally["seconds"] >= 0
    notebook.glue_run_time()
    values = results.load("06_x", "quick" if notebook.quick_mode() else "full")["values"]
    assert values["memo_cells"] == 2 and values["memo_read"] == 1


def test_json_written_and_read_back_keeps_the_order_of_its_keys(cache):
    # a cached outcome's shares iterate in the evaluator's task order, as a fresh one's do
    path = results.results_dir() / "x.json"
    results.write_json_atomically(path, {"shares": {"news": [1], "compare": [0], "sign": [1]}})
    assert list(json.loads(path.read_text())["shares"]) == ["news", "compare", "sign"]


def test_the_package_fingerprint_is_the_code_this_process_loaded(monkeypatch):
    first = results.code_fingerprint()

    def no_more_reading(*args):
        raise AssertionError("read the package again")
    monkeypatch.setattr(results.os, "listdir", no_more_reading)
    assert results.code_fingerprint() == first  # an edit on disk since does not change it
