"""The reader's edition of the chapters: notebooks whose prose reads well in plain Jupyter and Colab.

Introduced beside chapter 8's records (:mod:`merging_helpers.results`). The book's prose cites computed values through myst-nb roles
(``{glue:text}`name:.2f```, ``{glue:md}`name```) and hides the exercises' answers in
``{dropdown}`` blocks; only the book's build renders them, so in Jupyter and Colab a verdict
paragraph shows raw markup and every answer stands open. This module writes each chapter again
with every role replaced by its value, taken from the chapter's record of glued values
(:mod:`merging_helpers.results`: ``full`` after ``make book``, ``quick`` after ``make test``),
formatted as myst-nb formats it, and every dropdown turned into an HTML ``<details>`` block,
which Jupyter and Colab fold. A note at the top says which build the numbers come from: running
the code cells computes them again. ``python -m merging_helpers.reader_edition [--mode full]
[BOOK_DIR] [OUT_DIR]`` (``make reader-edition``).

The committed edition, ``book/reader/``, is the one the chapters' Colab badges open. ``make book``
writes it with ``--ship``: the build's full records are copied into the package first
(:func:`merging_helpers.results.ship`) and the edition is written from those shipped records, so a
test can write it again from the repository alone and fail when it is stale.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

from . import results

ROLE = re.compile(r"\{glue:(text|md)\}`([^`]+)`")
DROPDOWN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|:{3,})\{dropdown\}[ \t]*(?P<title>.*?)[ \t]*$")


class MissingValue(KeyError):
    """A role cites a name the chapter's record does not hold (chapter 8's records)."""


def format_glued(value, spec: str = "") -> str:
    """``value`` as ``{glue:text}`name:spec``` shows it (chapter 8's records; myst-nb's rule, which
    reads the value back from its repr: converted by the spec's type letter)."""
    if not spec:
        return str(value)
    kind = spec[-1]
    if kind in "bcdoxX":
        value = int(value)
    elif kind in "eEfFgGn%":
        value = float(value)
    elif kind == "s":
        value = str(value)
    return format(value, spec)


def render_roles(text: str, values: dict, chapter: str = "") -> str:
    """``text`` with every glue role replaced by its value from ``values`` (a chapter's record, chapter 8)."""
    def one(match):
        kind, body = match.groups()
        name, _, spec = body.partition(":")
        if name not in values:
            raise MissingValue(f"{chapter or 'the chapter'}: its prose cites {name!r}, which its record does not hold "
                               "(run the chapter again to write a complete record)")
        value = values[name]
        return str(value) if kind == "md" else format_glued(value, spec)
    return ROLE.sub(one, text)


def render_dropdowns(text: str) -> str:
    """``text`` with every ``{dropdown}`` fence (``` or :::, any indent) as a ``<details>`` block (chapter 8)."""
    out, closing = [], []
    for line in text.split("\n"):
        opened = DROPDOWN.match(line)
        if opened:
            indent, fence, title = opened.group("indent"), opened.group("fence"), opened.group("title") or "Answer"
            out += [f"{indent}<details><summary>{title}</summary>", ""]
            closing.append((indent, fence))
        elif closing and line.strip() == closing[-1][1]:
            indent, _ = closing.pop()
            out += ["", f"{indent}</details>"]
        else:
            out.append(line)
    if closing:
        raise ValueError(f"a {{dropdown}} opened with {closing[-1][1]!r} is never closed")
    return "\n".join(out)


def reader_notebook(notebook: dict, record: dict) -> dict:
    """A copy of a chapter's notebook with its markdown rendered from ``record`` (results.load's,
    chapter 8) and a note on where the numbers come from as its first cell."""
    out = copy.deepcopy(notebook)
    for cell in out["cells"]:
        if cell["cell_type"] == "markdown":
            source = "".join(cell["source"])
            cell["source"] = render_dropdowns(render_roles(source, record["values"], record["chapter"]))
    note = (f"*Reader's edition.* The numbers in this chapter's prose are those of the book's "
            f"**{record['mode']}** build (written {record['written']}); the code cells compute them again "
            "when you run them, so a run of yours may differ a little (another machine, fewer seeds in the quick mode).")
    out["cells"].insert(0, {"cell_type": "markdown", "id": "reader-edition-note", "metadata": {}, "source": note})
    return out


def write_edition(book_dir, out_dir, mode: str = "full", root=None, shipped: bool = False) -> list[Path]:
    """The reader's edition of every chapter in ``book_dir``, from its ``mode`` records in the cache
    (or, ``shipped``, from the full records shipped with the package), into ``out_dir`` (chapter 8)."""
    book_dir, out_dir = Path(book_dir), Path(out_dir)
    chapters = sorted(book_dir.glob("[0-9]*.ipynb"))
    if not chapters:
        raise FileNotFoundError(f"no chapter notebooks (NN_name.ipynb) in {book_dir}")
    have = results.shipped_path if shipped else (lambda c: results.record_path(c, mode, root))
    missing = [c.stem for c in chapters if not have(c.stem).exists()]
    if missing:
        raise results.MissingResult(f"no {'shipped' if shipped else mode} record of {missing}: run those chapters "
                                    f"first ({'make test' if mode == 'quick' and not shipped else 'make book'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter in chapters:
        record = results.load_shipped(chapter.stem) if shipped else results.load(chapter.stem, mode, root)
        notebook = reader_notebook(json.loads(chapter.read_text()), record)
        target = out_dir / chapter.name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(target)
        written.append(target)
    return written


def main(argv=None) -> None:
    """``python -m merging_helpers.reader_edition [--mode full|quick] [BOOK_DIR] [OUT_DIR]`` (chapter 8's records)."""
    parser = argparse.ArgumentParser(description="Write the reader's edition of the chapters.")
    parser.add_argument("book_dir", nargs="?", default="book")
    parser.add_argument("out_dir", nargs="?", default="_build/reader")
    parser.add_argument("--mode", choices=results.MODES, default="full", help="whose numbers: make book's or make test's")
    parser.add_argument("--ship", action="store_true",
                        help="copy the cache's full records into the package first, and write from those (make book)")
    args = parser.parse_args(argv)
    if args.ship:
        if args.mode != "full":
            parser.error("--ship ships the full build's records: leave --mode at full")
        for path in results.ship(args.book_dir):
            print("shipped", path)
    for path in write_edition(args.book_dir, args.out_dir, args.mode, shipped=args.ship):
        print("wrote", path)


if __name__ == "__main__":
    main()
