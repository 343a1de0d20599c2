"""Build the course assignments: ``python assignments/build.py [OUT] [--seed N] [--grade]`` (``make assignments``).

For every master notebook ``assignments/a*.ipynb`` this runs ``otter assign``, which writes
``OUT/<name>/student/<name>.ipynb`` (solutions replaced by ``...``, hidden tests removed: the
file to hand out) and ``OUT/<name>/autograder/<name>-autograder_*.zip`` (the autograder for
``otter run`` or Gradescope). OUT defaults to ``_build/assignments`` (not committed).
With ``--seed N`` the masters are first written for offering N (``OUT/masters-seed-N``: the hidden
tests' parameters drawn from N, make_masters.VARIANTS), so a class gets hidden tests no earlier
class or public copy has. With ``--grade`` it also grades each master's solution and the untouched
student copy with ``otter run`` and prints the scores and the time each took, as CI does
(tests/test_assignments.py).
"""

from __future__ import annotations

import argparse
import json
import os
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "_build" / "assignments"
TIMES = HERE / "grading_times.json"           # written by --grade --record, never typed
PAGE = HERE.parent / "book" / "assignments.md"
START, END = "<!-- assignment-times -->", "<!-- /assignment-times -->"


def masters() -> list[Path]:
    """The master notebooks, in order."""
    return sorted(HERE.glob("a[0-9]*.ipynb"))


def make_masters():
    """assignments/make_masters.py as a module (it writes the masters)."""
    spec = importlib.util.spec_from_file_location("make_masters", HERE / "make_masters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded_masters(seed: int, out: Path = DEFAULT_OUT) -> list[Path]:
    """The masters of offering ``seed``, written to ``out/masters-seed-<seed>`` beside the grading
    requirements they name; returns their paths, in order."""
    folder = out / f"masters-seed-{seed}"
    paths = make_masters().write(folder, seed)
    shutil.copyfile(HERE / "requirements.txt", folder / "requirements.txt")
    return sorted(paths)


# the Python whose otter assigns and grades: $MERGING_BOOK_GRADER_PYTHON (make test sets it to the venv
# made from assignments/requirements.txt alone, as a grading image is), else this one
GRADER_PYTHON = os.environ.get("MERGING_BOOK_GRADER_PYTHON") or sys.executable


def otter(*args: str, cwd: Path | None = None, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run the otter command line of the grading Python (:data:`GRADER_PYTHON`); ``threads``
    caps torch's threads in the grading kernel (when gradings run side by side)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(GRADER_PYTHON).parent), env.get("PATH", "")])  # its kernel, its tools
    env.pop("PYTHONPATH", None)
    result = subprocess.run([GRADER_PYTHON, "-m", "otter", *args], check=False, cwd=cwd, capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"otter {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}")
    return result


def assign(master: Path, out: Path = DEFAULT_OUT) -> Path:
    """``otter assign`` one master into ``out/<name>`` (replaced if it exists); returns that folder."""
    target = out / master.stem
    if target.exists():
        shutil.rmtree(target)
    otter("assign", "--no-pdfs", "--no-run-tests", master.name, str(target), cwd=master.parent)
    return target


def autograder_zip(folder: Path) -> Path:
    (found,) = sorted((folder / "autograder").glob("*-autograder_*.zip"))[-1:]
    return found


def grade(folder: Path, notebook: Path, out: Path, threads: int | None = None) -> dict[str, dict]:
    """Grade ``notebook`` with the assignment's autograder (``otter run``, no container).
    Returns question → {"score", "max_score", "output"}."""
    out.mkdir(parents=True, exist_ok=True)
    otter("run", "--no-logo", "-a", str(autograder_zip(folder)), "-o", str(out), str(notebook), threads=threads)
    tests = json.loads((out / "results.json").read_text())["tests"]
    return {t["name"]: t for t in tests if t.get("max_score") is not None}


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def times_table(data: dict) -> str:
    """The instructor page's table of measured grading times (from :data:`TIMES`)."""
    rows = ["| assignment | auto-graded points | solution graded in | student copy graded in |", "|---|---|---|---|"]
    for name, t in data["assignments"].items():
        rows.append(f"| `{name}` | {t['points']:g} | {t['solution_s']:.0f} s | {t['student_s']:.0f} s |")
    return "\n".join(rows) + f"\n\nMeasured with `python assignments/build.py --grade --record`: {data['note']}."


def splice(page: Path, start: str, end: str, body: str) -> None:
    """Write ``body`` between the page's markers ``start`` and ``end`` (atomically)."""
    head, rest = page.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    write_atomically(page, f"{head}{start}\n{body}\n{end}{tail}")


def render(page: Path = PAGE) -> None:
    """Write :func:`times_table` between the page's markers."""
    splice(page, START, END, times_table(json.loads(TIMES.read_text())))


def record(times: dict) -> None:
    """Store the grading times of this run (one ``otter run`` at a time) and render the page's table."""
    note = (f"{os.cpu_count()} CPU cores, one grading at a time, each `otter run` from a fresh kernel "
            f"(the grading zoo cached), {time.strftime('%Y-%m-%d')}")
    write_atomically(TIMES, json.dumps({"note": note, "assignments": times}, indent=1, ensure_ascii=False) + "\n")
    render()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help="output folder (default _build/assignments)")
    parser.add_argument("--seed", type=int, help="draw the hidden tests' parameters for this offering")
    parser.add_argument("--grade", action="store_true", help="grade each solution and each empty student copy")
    parser.add_argument("--record", action="store_true", help=f"with --grade: store the times in {TIMES.name} "
                        "and write them into the instructors' page")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    times = {}
    for master in masters() if args.seed is None else seeded_masters(args.seed, out):
        folder = assign(master, out)
        print(f"{master.stem}: student copy {folder / 'student' / master.name}, autograder {autograder_zip(folder).name}")
        if args.grade:
            for who, nb in (("solution", folder / "autograder" / master.name), ("student", folder / "student" / master.name)):
                start = time.perf_counter()
                scores = grade(folder, nb, folder / f"graded-{who}")
                total = sum(t["score"] for t in scores.values()), sum(t["max_score"] for t in scores.values())
                seconds = time.perf_counter() - start
                print(f"  {who}: {total[0]:g} / {total[1]:g} points, graded in {seconds:.0f} s")
                times.setdefault(master.stem, {"points": total[1]})[f"{who}_s"] = round(seconds, 1)
    if args.record and args.grade:
        record(times)


if __name__ == "__main__":
    main()
