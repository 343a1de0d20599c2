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
