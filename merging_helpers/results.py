"""Every chapter's glued numbers, kept on disk so that chapter 8 can read them.

Introduced in chapter 8. A chapter that calls ``setup(chapter="04_apl")`` starts a
*record*; every :func:`merging_helpers.notebook.glue` adds its value to it, and the last
cell (:func:`merging_helpers.notebook.glue_run_time`) marks it complete. The record is a
small JSON file in the zoo cache, one per chapter and mode (``results/04_apl.full.json``,
``.quick.json`` for the CI's quick mode), written atomically: an interrupted chapter
leaves the previous complete record in place. Chapter 8 reads these records instead of
recomputing chapters 2–7, and runs a chapter again (:func:`run_chapter`) when its record
is missing.

The full records of the book's last build travel with the package (``merging_helpers/records/``,
written by :func:`ship` in ``make book``, each stamped with the hash of its chapter's code
cells): where the cache has no full record, :func:`load` reads the shipped one, so chapter 8
opened alone on Colab does not need chapters 4–7 run first, and the reader's edition
(:mod:`merging_helpers.reader_edition`) is written from them.

:func:`memo` keeps the expensive grids of chapters 6–8 the same way (``results/memo/``):
a rebuild with the same code re-reads them; ``MERGING_BOOK_FRESH=1`` recomputes everything.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .optional import require

MODES = ("full", "quick")
_current: dict | None = None  # the record of the chapter this kernel is running
_tally = {"read": 0, "computed": 0, "seconds": 0.0}  # this chapter's memo: cells re-read / computed, compute time


class MissingResult(LookupError):
    """A chapter's record, or a value in it, is not on disk (chapter 8)."""


def quick_mode() -> bool:
    """True where ``$MERGING_BOOK_QUICK=1``: a chapter then runs smaller grids and fewer seeds
    through the same code (``make test`` sets it, the CI's classroom mode; ``make book`` never
    does) (chapter 0)."""
    return os.environ.get("MERGING_BOOK_QUICK", "") == "1"


def results_dir(root=None) -> Path:
    """``<zoo cache>/results`` (chapter 8)."""
    from .zoo import cache_root
    folder = cache_root(root) / "results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


SHIPPED = Path(__file__).parent / "records"  # the last full build's records, shipped with the package


def record_path(chapter: str, mode: str, root=None) -> Path:
    """``<cache>/results/<chapter>.<mode>.json`` (chapter 8)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return results_dir(root) / f"{chapter}.{mode}.json"


def _plain(value):
    """A JSON-able copy of a glued value: numbers, text (Markdown → its text), lists."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    data = getattr(value, "data", None)  # IPython.display.Markdown
    return data if isinstance(data, str) else str(value)


def write_json_atomically(path, payload) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and one ``os.replace`` (chapter 8).
    Keys keep their order, so a value read back iterates as the one written (a bootstrap over
    tasks draws the same indices from a cached outcome as from a fresh one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def start(chapter: str, mode: str, root=None) -> None:
    """Begin the record of ``chapter`` (called by ``setup(chapter=...)``, chapter 8)."""
    global _current
    if not chapter or "/" in chapter or chapter.startswith("."):
        raise ValueError(f"chapter must be a notebook's file stem such as '04_apl', got {chapter!r}")
    _current = {"chapter": chapter, "mode": mode, "root": root, "values": {}, "started": time.time()}
    _tally.update(read=0, computed=0, seconds=0.0)


def add(name: str, value) -> None:
    """Add one glued value to the current record (no-op when no chapter started one) (chapter 8)."""
    if _current is not None:
        _current["values"][name] = _plain(value)


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def current() -> dict:
    """The record the running chapter has glued so far, shaped like :func:`load`'s (chapter 8: its
    own claims sit beside the earlier chapters')."""
    if _current is None:
        raise MissingResult("no chapter record is open: call setup(chapter=...) first")
    return {"chapter": _current["chapter"], "mode": _current["mode"], "written": _stamp(),
            "values": dict(_current["values"])}


def finish(seconds: float) -> Path | None:
    """Write the current record and return its path (a chapter's last cell; chapter 8)."""
    if _current is None:
        return None
    payload = {"chapter": _current["chapter"], "mode": _current["mode"], "seconds": round(seconds, 1),
               "written": _stamp(),
               "values": _current["values"]}
    path = record_path(_current["chapter"], _current["mode"], _current["root"])
    write_json_atomically(path, payload)
    return path


def load(chapter: str, mode: str, root=None) -> dict:
    """The complete record of ``chapter`` in ``mode``: the cache's, else (full mode) the one
    shipped with the package; :class:`MissingResult` when there is none (chapter 8)."""
    path = record_path(chapter, mode, root)
    if path.exists():
        return json.loads(path.read_text())
    if mode == "full" and shipped_path(chapter).exists():
        return load_shipped(chapter)
    raise MissingResult(f"no {mode} record of chapter {chapter} in {path.parent}: run the chapter "
                        f"(or results.run_chapter({chapter!r}))")


def shipped_path(chapter: str) -> Path:
    """``merging_helpers/records/<chapter>.full.json``: the book's last full build of ``chapter`` (chapter 8)."""
    return SHIPPED / f"{chapter}.full.json"


def load_shipped(chapter: str) -> dict:
    """The full record of ``chapter`` shipped with the package (:func:`ship`), ``shipped`` set (chapter 8)."""
    path = shipped_path(chapter)
    if not path.exists():
        raise MissingResult(f"no record of chapter {chapter} is shipped with the package ({path} is missing): "
                            "`make book` writes them")
    return json.loads(path.read_text()) | {"shipped": True}


def code_cells_hash(notebook_path) -> str:
    """SHA-256 (16 hex digits) of a chapter notebook's code cells, in order: what its record was
    computed by (a shipped record is stale when they change). The repository's URL in the install
    line is left out, so that ``set-repository`` on a fork keeps the records current (chapter 8)."""
    cells = json.loads(Path(notebook_path).read_text())["cells"]
    code = "\x00".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code = re.sub(r"https://github\.com/[\w.-]+/[\w.-]+", "https://github.com/<repository>", code)
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def ship(book_dir, root=None) -> list[Path]:
    """Copy every chapter's full record from the cache into the package (``make book``), each
    stamped with :func:`code_cells_hash` of its notebook in ``book_dir`` (chapter 8)."""
    chapters = sorted(Path(book_dir).glob("[0-9]*.ipynb"))
    missing = [c.stem for c in chapters if not record_path(c.stem, "full", root).exists()]
    if missing:
        raise MissingResult(f"no full record of {missing} in {results_dir(root)}: run `make book` first")
    SHIPPED.mkdir(exist_ok=True)
    written = []
    for chapter in chapters:
        record = json.loads(record_path(chapter.stem, "full", root).read_text())
        record["code_cells"] = code_cells_hash(chapter)
        write_json_atomically(shipped_path(chapter.stem), record)
        written.append(shipped_path(chapter.stem))
    return written


def run_chapter(chapter: str, mode: str, book_dir=None, timeout: int = 3600) -> dict:
    """Execute ``book/<chapter>.ipynb`` in ``mode`` (its record is written by its own last
    cell) and return the record. Needs the book's folder (a clone of the repository) (chapter 8)."""
    nbformat = require("nbformat", "running a chapter for its record")
    NotebookClient = require("nbclient", "running a chapter for its record").NotebookClient
    book_dir = Path(book_dir) if book_dir is not None else Path.cwd()
    path = book_dir / f"{chapter}.ipynb"
    if not path.exists():
        raise MissingResult(f"chapter {chapter} has no record and its notebook {path} is not here: "
                            "run the chapter first, or pass book_dir= (the book/ folder of a clone)")
    saved = os.environ.get("MERGING_BOOK_QUICK")
    os.environ["MERGING_BOOK_QUICK"] = "1" if mode == "quick" else "0"
    try:
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(notebook, timeout=timeout, resources={"metadata": {"path": str(book_dir)}}).execute()
    finally:
        if saved is None:
            os.environ.pop("MERGING_BOOK_QUICK", None)
        else:
            os.environ["MERGING_BOOK_QUICK"] = saved
    return load(chapter, mode)


def load_or_run(chapters, mode: str, book_dir=None, progress: bool = True) -> dict[str, dict]:
    """The records of ``chapters`` (the cache's, else in full mode the shipped ones), running (in
    order) the chapters that have neither (chapter 8). Where such a chapter's notebook is not
    beside this one (a chapter opened alone), nothing runs: one error lists every chapter to run
    first, in this mode."""
    from tqdm.auto import tqdm
    chapters = list(chapters)
    book = Path(book_dir) if book_dir is not None else Path.cwd()
    absent = [c for c in chapters if not record_path(c, mode).exists() and not (book / f"{c}.ipynb").exists()
              and not (mode == "full" and shipped_path(c).exists())]
    if absent:
        raise MissingResult(
            f"this chapter reads the numbers other chapters stored when they ran ({mode} mode) in this cache "
            f"({results_dir()}), and {len(absent)} have not run here: {', '.join(absent)}. Run them first, in this "
            f"runtime and mode (or open the whole book from a clone of its repository, where they are run for you)")
    records = {}
    for chapter in tqdm(chapters, desc="chapter records", disable=not progress):
        try:
            records[chapter] = load(chapter, mode)
        except MissingResult:
            records[chapter] = run_chapter(chapter, mode, book_dir)
    return records


# ---- memo: a chapter's expensive grid, re-read by a warm rebuild --------------------------------------------

# modules that keep records, draw widgets, grade or translate configs: no merge or score reads them
BOOKKEEPING = ("results.py", "verdicts.py", "notebook.py", "mergekit_yaml.py", "explorer.py", "apl_explorer.py",
               "rms_explorer.py", "grading.py", "lanes.py", "book_build.py")  # lanes, book_build: how chapters are run


_package_fingerprint: str | None = None


def code_fingerprint(folder=None) -> str:
    """SHA-256 (16 hex digits) of the package's reference modules but the :data:`BOOKKEEPING`
    ones: a changed method invalidates every stored result computed with it (chapter 8).
    For the package itself it is read once per process, so it names the code this kernel
    loaded, not a file edited on disk since (and a grid of many cells hashes it once)."""
    global _package_fingerprint
    if folder is None:
        if _package_fingerprint is None:
            from . import __file__ as package_init
            _package_fingerprint = code_fingerprint(os.path.dirname(package_init))
        return _package_fingerprint
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name not in BOOKKEEPING:
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _cells_so_far() -> list[str]:
    """The notebook's code cells run so far, this one included ([] outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    return list(shell.user_ns.get("In", [])) if shell is not None else []


def fresh() -> bool:
    """True where ``$MERGING_BOOK_FRESH=1``: :func:`memo` recomputes (and stores) every value (chapter 6)."""
    return os.environ.get("MERGING_BOOK_FRESH", "") == "1"


def memo(name: str, key: Mapping, compute: Callable[[], object], root=None):
    """``compute()``, stored as JSON and read back when the same ``name`` and ``key`` come again
    with the same code (chapters 6–8: a warm rebuild re-reads a chapter's grid of merges).

    "The same code" is the package's reference modules and, in a notebook, every cell run so
    far (so an edit anywhere above recomputes); the quick/full mode is part of the key. The value
    must be JSON (numbers, text, None, lists, dicts with text keys); a cold run returns it as
    read back from JSON too, so a cold and a warm build compute on the same types."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"memo: name must be letters, digits, '_', '.' or '-', got {name!r}")
    cells = hashlib.sha256("\x00".join(_cells_so_far()).encode()).hexdigest()[:16]
    blob = json.dumps({"name": name, "key": key, "quick": quick_mode(), "code": code_fingerprint(),
                       "cells": cells}, sort_keys=True, default=str)
    folder = results_dir(root) / "memo"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"
    if path.exists() and not fresh():
        stored = json.loads(path.read_text())
        _tally["read"] += 1
        _tally["seconds"] += stored.get("seconds", 0.0)
        return stored["value"]
    started = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - started
    try:
        text = json.dumps(value, allow_nan=True)
    except TypeError as error:
        raise TypeError(f"memo {name!r}: the value must be JSON (numbers, text, lists, dicts): {error}") from None
    write_json_atomically(path, {"name": name, "key": json.loads(blob)["key"], "seconds": round(seconds, 3),
                                 "value": json.loads(text)})
    _tally["computed"] += 1
    _tally["seconds"] += seconds
    return json.loads(text)


def memo_tally() -> dict:
    """This chapter's :func:`memo` calls so far: ``read`` (from disk), ``computed``, and ``seconds``,
    the time computing all of them takes (measured now or when stored) (chapters 6–8)."""
    return dict(_tally)
