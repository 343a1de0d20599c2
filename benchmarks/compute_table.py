#!/usr/bin/env python
"""The compute table of the README and the book's introduction: how long each chapter takes.

Times are measured, never typed: ``record --records DIR`` reads each chapter's own run time from
the records a run wrote (``<cache>/results``; ``seconds``, measured by the chapter's last cell):
the quick records of ``make test`` (each chapter run alone from the reader's install), the full
ones of ``make book``. ``record LOG`` reads the durations pytest printed for
``tests/test_chapters_alone.py`` (``--durations=0``) instead; those are each chapter's time only
when the chapters run one at a time in the foreground (``make test`` now runs them two at a time
in the background, where a test's duration is its wait). Both store the times under a column name
in ``benchmarks/compute_times.json``; ``render`` writes the table between the
``<!-- compute-table -->`` markers of README.md and book/intro.md. A column nobody measured
reads "unmeasured".

    python benchmarks/compute_table.py record --records ~/.cache/merging_book/results --column "quick, cold" --note ...
    python benchmarks/compute_table.py record --records ~/.cache/merging_book/results --column "full, cold" --note ...
    python benchmarks/compute_table.py record --records DIR --column "full, cold" --only 08b_language_model --note ...
    python benchmarks/compute_table.py render
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMES = ROOT / "benchmarks" / "compute_times.json"
TARGETS = [ROOT / "README.md", ROOT / "book" / "intro.md"]
COLUMNS = ["quick, cold", "quick, warm", "full, cold", "full, warm", "GPU (H200), quick"]
START, END = "<!-- compute-table -->", "<!-- /compute-table -->"
DURATION = re.compile(r"^\s*([\d.]+)s call\s+tests/test_chapters_alone\.py::\S+\[([\w-]+)\]", re.M)


def chapter_durations(log: str) -> dict[str, float]:
    """chapter → seconds, from pytest's ``--durations`` lines of the chapter tests."""
    return {chapter: float(seconds) for seconds, chapter in DURATION.findall(log)}


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def record_durations(folder: Path, mode: str = "full") -> dict[str, float]:
    """chapter → seconds, from the ``<chapter>.<mode>.json`` records in ``folder`` (a build's own timing)."""
    return {path.name.split(".")[0]: float(json.loads(path.read_text())["seconds"])
            for path in sorted(folder.glob(f"[0-9]*.{mode}.json"))}


def record(source: Path, column: str, note: str, from_records: bool = False, only=None) -> dict:
    if column not in COLUMNS:
        raise SystemExit(f"--column must be one of {COLUMNS}, got {column!r}")
    if from_records:
        found = record_durations(source, "quick" if column.startswith("quick") else "full")
        if not found:
            raise SystemExit(f"{source}: no chapter records for the column {column!r}")
    else:
        found = chapter_durations(source.read_text(errors="replace"))
        if not found:
            raise SystemExit(f"{source}: no durations of tests/test_chapters_alone.py (run pytest with --durations=0)")
    data = json.loads(TIMES.read_text()) if TIMES.exists() else {"columns": {}}
    if only:
        data["columns"][column] = measured_apart(data["columns"].get(column), found, only, note, source, column)
    else:
        data["columns"][column] = {"seconds": found, "note": note, "apart": []}
    _write_atomically(TIMES, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


def measured_apart(old: dict | None, found: dict, only, note: str, source: Path, column: str) -> dict:
    """The column with the chapters ``only`` measured anew: their times and one note for them,
    which replaces what an earlier measurement said of them; the other chapters' times kept (the
    column's own note goes once every chapter has been measured apart)."""
    missing = [c for c in only if c not in found]
    if missing:
        raise SystemExit(f"{source}: no times of {missing} for the column {column!r}")
    old = old or {"seconds": {}, "note": ""}
    apart = [{"chapters": [c for c in a["chapters"] if c not in only], "note": a["note"]} for a in old.get("apart", [])]
    apart = [a for a in apart if a["chapters"]] + [{"chapters": list(only), "note": note}]
    seconds = {**old["seconds"], **{c: found[c] for c in only}}
    under_note = set(seconds) - {c for a in apart for c in a["chapters"]}
    # the run that filled the column keeps its note while it still times a chapter of it
    return {"seconds": seconds, "note": old["note"] if under_note else "", "apart": apart}


def column_note(column: dict) -> str:
    """The column's note: the run that filled it, then each group of chapters measured apart."""
    parts = [column["note"]] if column["note"] else []
    return "; ".join(parts + [f"{', '.join(a['chapters'])}: {a['note']}" for a in column.get("apart", [])])


def _minutes(seconds: float | None) -> str:
    return "unmeasured" if seconds is None else f"{seconds / 60:.1f}"


def table(data: dict) -> str:
    columns = data["columns"]
    chapters = sorted({c for col in columns.values() for c in col["seconds"]})
    lines = ["| chapter | " + " | ".join(f"{c} (min)" for c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for chapter in chapters:
        cells = [_minutes(columns.get(c, {}).get("seconds", {}).get(chapter)) for c in COLUMNS]
        lines.append(f"| {chapter} | " + " | ".join(cells) + " |")
    totals = [_minutes(sum(columns[c]["seconds"].values())) if c in columns else "unmeasured" for c in COLUMNS]
    lines.append("| **all chapters** | " + " | ".join(f"**{t}**" for t in totals) + " |")
    notes = [f"*{c}*: {column_note(columns[c])}" for c in COLUMNS if c in columns]
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + "\n"


def render() -> None:
    text = table(json.loads(TIMES.read_text()))
    for path in TARGETS:
        page = path.read_text()
        if START not in page or END not in page:
            raise SystemExit(f"{path}: no {START} … {END} markers")
        head, rest = page.split(START, 1)
        _, tail = rest.split(END, 1)
        _write_atomically(path, f"{head}{START}\n{text}{END}{tail}")
        print("wrote the table into", path.relative_to(ROOT))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="store the chapter durations of a pytest log (or of records) under a column")
    rec.add_argument("log", type=Path, nargs="?", help="a pytest log with --durations=0")
    rec.add_argument("--records", type=Path, help="instead of a log: a folder of chapter records (make book's)")
    rec.add_argument("--column", required=True, choices=COLUMNS)
    rec.add_argument("--note", default="", help="the machine and conditions of the measurement")
    rec.add_argument("--only", default="", help="a comma list of chapters: store just their times in the column "
                                                "(the others' kept), with the note added after the column's")
    sub.add_parser("render", help="write the table into README.md and book/intro.md")
    args = parser.parse_args(argv)
    if args.command == "record":
        if (args.log is None) == (args.records is None):
            parser.error("record: give a pytest log or --records DIR, not both")
        record(args.records or args.log, args.column, args.note, from_records=args.records is not None,
               only=[c for c in args.only.split(",") if c])
    render()


if __name__ == "__main__":
    main()
