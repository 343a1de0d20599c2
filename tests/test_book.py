"""The chapters' Markdown parses as intended: every dropdown (exercise answers) is one
block whose inner code fences are closed inside it (a 3-backtick dropdown around a
```python fence ends at the inner fence and spills the rest of the answer onto the page)."""
import json
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

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
    assert badges == [f"{owner_repo}/blob/{branch}/book/{chapter.name}"], badges
    assert re.findall(r'REPOSITORY = "([^"]+)"', text) == [url]
    assert '%pip install -q "merging_helpers[colab] @ git+{REPOSITORY}"' in text


def test_set_repository_rewrites_every_place(tmp_path):
    import shutil

    from merging_helpers import notebook

    root = tmp_path / "copy"
    (root / "book").mkdir(parents=True)
    for f in ["_config.yml", "README.md"]:
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
