"""merging_helpers.reader_edition: the chapters' prose with every glue role replaced by its value,
formatted as myst-nb formats it (checked against myst-nb's own function), and every dropdown folded."""
import json
import re
from pathlib import Path

import pytest

from merging_helpers import reader_edition as re_ed
from merging_helpers import results

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9]*.ipynb"))


def _markdown(chapter: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("value", [0.123456, 3, -2.5e-07, 1234567.891, True, "abc", "0.5", 0.0, -0.049])
@pytest.mark.parametrize("spec", ["", ".2f", ".1%", ".3g", "+.2f", ",.0f", ".2e", "d", "s", ">8.3f"])
def test_a_value_is_formatted_as_myst_nb_formats_it(value, spec):
    from myst_nb.core.variables import format_plain_text   # the book build's own rule: the outside reference
    try:
        want = format_plain_text(repr(value), spec)   # myst-nb reads the text/plain output, i.e. the repr
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            re_ed.format_glued(value, spec)
        return
    assert re_ed.format_glued(value, spec) == want


def test_roles_and_dropdowns_become_plain_markdown():
    text = ("Accuracy {glue:text}`acc:.1%` ({glue:md}`verdict`), n = {glue:text}`n`.\n\n"
            "1. An exercise.\n\n   ````{dropdown} Answer\n   ```python\n   x = 1\n   ```\n   ````\n")
    out = re_ed.render_dropdowns(re_ed.render_roles(text, {"acc": 0.8125, "verdict": "**above** TA", "n": 12}))
    assert out.startswith("Accuracy 81.2% (**above** TA), n = 12.")
    assert "   <details><summary>Answer</summary>\n\n   ```python\n   x = 1\n   ```\n\n   </details>" in out
    with pytest.raises(re_ed.MissingValue, match=r"04_apl: its prose cites 'gone'"):
        re_ed.render_roles("{glue:text}`gone:.2f`", {}, "04_apl")
    with pytest.raises(ValueError, match="never closed"):
        re_ed.render_dropdowns("```{dropdown} Answer\nno end")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_renders_to_markdown_jupyter_reads(chapter):
    """Every role and dropdown of the chapter is understood (values stand in for its record's)."""
    names = {m.group(2).partition(":")[0] for text in _markdown(chapter) for m in re_ed.ROLE.finditer(text)}
    fake = {"chapter": chapter.stem, "mode": "full", "written": "now", "values": {n: 0.5 for n in names}}
    notebook = re_ed.reader_notebook(json.loads(chapter.read_text()), fake)
    rendered = "\n".join(c["source"] for c in notebook["cells"] if c["cell_type"] == "markdown")
    assert "{glue" not in rendered and "{dropdown}" not in rendered
    raw = re.findall(r"\{[a-z][\w:-]*\}`|^[ \t]*(?:`{3,}|:{3,})[ \t]*\{[a-z]", rendered, flags=re.MULTILINE)
    assert not raw, f"MyST that Jupyter shows raw: {raw[:3]}"   # any role or directive: {numref}`…`, :::{note}
    opened = sum(len(re.findall(r"\{dropdown\}", t)) for t in _markdown(chapter))
    assert rendered.count("<details>") == rendered.count("</details>") == opened
    assert notebook["cells"][0]["id"] == "reader-edition-note"


def test_the_edition_from_the_chapters_records(tmp_path, chapters_finished):
    """Every role of every chapter has a value in its record (make test's chapters, running in the
    background, write the quick ones; this waits for them): the edition is complete, and it keeps
    the code cells as they are."""
    if not all(results.record_path(c.stem, "quick").exists() for c in CHAPTERS):
        pytest.skip("the chapters' quick records are not written yet (make test runs the chapters first)")
    written = re_ed.write_edition(ROOT / "book", tmp_path, "quick")
    assert [p.name for p in written] == [c.name for c in CHAPTERS]
    for chapter, path in zip(CHAPTERS, written):
        original, edition = json.loads(chapter.read_text()), json.loads(path.read_text())
        code = lambda nb: [c["source"] for c in nb["cells"] if c["cell_type"] == "code"]  # noqa: E731
        assert code(edition) == code(original)
        assert "{glue" not in path.read_text()
    with pytest.raises(results.MissingResult, match="no full record"):
        re_ed.write_edition(ROOT / "book", tmp_path / "full", "full", root=tmp_path / "empty-cache")


SHIPPED = sorted(results.SHIPPED.glob("*.full.json"))
EDITION = ROOT / "book" / "reader"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_ships_the_full_record_of_its_code(chapter):
    """`make book` ships each chapter's full record stamped with its code cells: a chapter whose
    code changed since has a stale record (and edition) until the book is built again."""
    record = results.load_shipped(chapter.stem)
    assert record["mode"] == "full" and record["chapter"] == chapter.stem
    assert record["code_cells"] == results.code_cells_hash(chapter), (
        f"{chapter.name}'s code cells changed since its record was shipped: run `make book`")


def test_the_committed_edition_is_the_one_the_shipped_records_write(tmp_path):
    written = re_ed.write_edition(ROOT / "book", tmp_path, shipped=True)
    assert sorted(p.name for p in EDITION.glob("*.ipynb")) == [p.name for p in written]
    for path in written:
        assert (EDITION / path.name).read_text() == path.read_text(), (
            f"book/reader/{path.name} is stale (its chapter's prose or record changed): run `make book`")


def test_a_changed_code_cell_makes_the_shipped_record_stale(tmp_path):
    notebook = json.loads(CHAPTERS[0].read_text())
    before = results.code_cells_hash(CHAPTERS[0])
    code = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    code["source"] = "".join(code["source"]) + "\n"
    (tmp_path / CHAPTERS[0].name).write_text(json.dumps(notebook))
    assert results.code_cells_hash(tmp_path / CHAPTERS[0].name) != before
    markdown = next(c for c in notebook["cells"] if c["cell_type"] == "markdown")
    markdown["source"] = "changed prose"
    code["source"] = code["source"][:-1]
    (tmp_path / CHAPTERS[0].name).write_text(json.dumps(notebook))
    assert results.code_cells_hash(tmp_path / CHAPTERS[0].name) == before   # prose is the edition's test


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_the_colab_badge_opens_the_reader_edition(chapter):
    badges = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", "\n".join(_markdown(chapter)))
    assert badges and all(b.endswith(f"/blob/main/book/reader/{chapter.name}") for b in badges), badges


def test_a_chapter_alone_reads_the_shipped_records(tmp_path, monkeypatch):
    """Chapter 8 opened alone (no sibling notebooks, an empty cache) reads the shipped full
    records; the quick mode, which ships none, still lists what to run first."""
    monkeypatch.setenv("MERGING_BOOK_CACHE", str(tmp_path / "cache"))
    shipped = results.load_shipped("04_apl")
    records = results.load_or_run(["04_apl"], "full", book_dir=tmp_path, progress=False)
    assert records["04_apl"]["values"] == shipped["values"] and records["04_apl"]["shipped"]
    with pytest.raises(results.MissingResult, match="have not run here: 04_apl"):
        results.load_or_run(["04_apl"], "quick", book_dir=tmp_path, progress=False)
    mine = dict(shipped, values={"x": 1}, written="later")
    results.write_json_atomically(results.record_path("04_apl", "full"), mine)
    assert results.load("04_apl", "full")["values"] == {"x": 1}   # the cache's own record comes first


def test_ship_stamps_each_record_with_its_chapter_code(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "SHIPPED", tmp_path / "records")
    book = tmp_path / "book"
    book.mkdir()
    (book / "01_x.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["x = 1"]}]}))
    with pytest.raises(results.MissingResult, match=r"no full record of \['01_x'\]"):
        results.ship(book, root=tmp_path / "cache")
    results.write_json_atomically(results.record_path("01_x", "full", tmp_path / "cache"),
                                  {"chapter": "01_x", "mode": "full", "written": "t", "values": {"a": 2}})
    [path] = results.ship(book, root=tmp_path / "cache")
    assert json.loads(path.read_text())["code_cells"] == results.code_cells_hash(book / "01_x.ipynb")
    assert results.load_shipped("01_x")["values"] == {"a": 2}


def test_a_fork_naming_its_repository_keeps_the_shipped_records_current(tmp_path):
    """`set-repository` rewrites the install line of every chapter's first code cell: that alone
    must not make the shipped records stale (the repository's URL is not part of the hash)."""
    from merging_helpers import notebook
    text = CHAPTERS[0].read_text()
    forked = text.replace(notebook.REPOSITORY, "https://github.com/someone/merging-fork")
    assert forked != text
    (tmp_path / CHAPTERS[0].name).write_text(forked)
    assert results.code_cells_hash(tmp_path / CHAPTERS[0].name) == results.code_cells_hash(CHAPTERS[0])
