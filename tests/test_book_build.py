"""merging_helpers.book_build: make book's chapters executed in lanes, then staged for jupyter-book."""
import json
from pathlib import Path

import nbformat
import pytest

from merging_helpers import book_build

CONFIG = ("title: t\nexecute:\n  execute_notebooks: force       # every build runs every chapter\n  timeout: 77\n"
          "sphinx:\n  config:\n    suppress_warnings: [\"image.nonlocal_uri\"]\n")


def notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def repository(tmp_path: Path, *chapters: tuple[str, str]) -> Path:
    (tmp_path / "_config.yml").write_text(CONFIG)
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# intro\n")
    for stem, source in chapters:
        notebook(tmp_path / "book" / f"{stem}.ipynb", source)
    return tmp_path


def test_chapters_8_8b_wait_for_every_chapter_before_8_and_9_for_7():
    stems = ["00_model_zoo", "04_apl", "07_rms_adaptive", "08_side_by_side", "08b_language_model",
             "09_merging_at_scale"]
    waits = book_build.waits_for(stems)
    assert waits["08_side_by_side"] == waits["08b_language_model"] == {"00_model_zoo", "04_apl", "07_rms_adaptive"}
    assert waits["09_merging_at_scale"] == {"07_rms_adaptive"}
    assert "00_model_zoo" not in waits


def test_the_cell_timeout_is_read_from_the_config():
    assert book_build.cell_timeout(CONFIG) == 77
    assert book_build.cell_timeout("execute:\n  execute_notebooks: force\n") == 1200


def test_the_stage_holds_the_executed_chapters_with_execution_off_and_no_reader_edition(tmp_path):
    root = repository(tmp_path, ("01_a", "1 + 1"))
    notebook(root / "book" / "reader" / "01_a.ipynb", "reader")
    executed = notebook(root / "_build" / "executed" / "book" / "01_a.ipynb", "'executed'")
    staged = book_build.stage(root)
    assert 'execute_notebooks: "off"' in (staged / "_config.yml").read_text()
    assert "timeout: 77" in (staged / "_config.yml").read_text()
    assert 'suppress_warnings: ["mystnb.stderr", "image.nonlocal_uri"]' in (staged / "_config.yml").read_text()
    assert (staged / "book" / "01_a.ipynb").read_text() == executed.read_text()
    assert (staged / "_toc.yml").exists() and (staged / "book" / "intro.md").exists()
    assert not (staged / "book" / "reader").exists()
    assert "1 + 1" in (root / "book" / "01_a.ipynb").read_text()  # the source is untouched


@pytest.mark.slow
def test_every_chapter_is_executed_into_the_build_and_a_failing_one_is_named(tmp_path):
    root = repository(tmp_path, ("01_ok", "import os\nprint(os.environ['OMP_NUM_THREADS'], 6 * 7)"),
                      ("02_bad", "raise ValueError('broken cell')"))
    with pytest.raises(SystemExit, match="02_bad") as failed:
        book_build.execute_book(root, lanes=2)
    assert "broken cell" in str(failed.value)
    out = json.loads((root / "_build" / "executed" / "book" / "01_ok.ipynb").read_text())
    assert "".join(out["cells"][0]["outputs"][0]["text"]) == "1 42\n"  # one thread per lane
    bad = (root / "_build" / "executed" / "book" / "02_bad.ipynb").read_text()
    assert "broken cell" in bad  # the failed copy is written, with its traceback
    assert "outputs\": []" in (root / "book" / "01_ok.ipynb").read_text()


def test_a_config_without_what_the_stage_rewrites_is_refused():
    with pytest.raises(ValueError, match="suppress_warnings"):
        book_build.config_without_execution("execute:\n  execute_notebooks: force\n", ("mystnb.stderr",))
    assert 'execute_notebooks: "off"' in book_build.config_without_execution("execute:\n  execute_notebooks: force\n")


def test_in_the_quick_mode_8b_waits_for_nothing():
    assert "08b_language_model" not in book_build.waits_for(["07_rms_adaptive", "08b_language_model"], full=False)
