"""Build the course assignments: ``python assignments/build.py [OUT] [--grade]`` (``make assignments``).

For every master notebook ``assignments/a*.ipynb`` this runs ``otter assign``, which writes
``OUT/<name>/student/<name>.ipynb`` (solutions replaced by ``...``, hidden tests removed: the
file to hand out) and ``OUT/<name>/autograder/<name>-autograder_*.zip`` (the autograder for
``otter run`` or Gradescope). OUT defaults to ``_build/assignments`` (not committed).
With ``--grade`` it also grades each master's solution and the untouched student copy with
``otter run`` and prints the scores, as CI does (tests/test_assignments.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "_build" / "assignments"


def masters() -> list[Path]:
    """The master notebooks, in order."""
    return sorted(HERE.glob("a[0-9]*.ipynb"))


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help="output folder (default _build/assignments)")
    parser.add_argument("--grade", action="store_true", help="grade each solution and each empty student copy")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    for master in masters():
        folder = assign(master, out)
        print(f"{master.stem}: student copy {folder / 'student' / master.name}, autograder {autograder_zip(folder).name}")
        if args.grade:
            for who, nb in (("solution", folder / "autograder" / master.name), ("student", folder / "student" / master.name)):
                scores = grade(folder, nb, folder / f"graded-{who}")
                total = sum(t["score"] for t in scores.values()), sum(t["max_score"] for t in scores.values())
                print(f"  {who}: {total[0]:g} / {total[1]:g} points")


if __name__ == "__main__":
    main()
