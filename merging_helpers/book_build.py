"""How ``make book`` runs the chapters whose records chapter 8 reads (book infrastructure): each
executed top to bottom by nbclient in a kernel of its own, two at a time on one thread each
(:mod:`merging_helpers.lanes`), a chapter that reads the full records of others after them; then
jupyter-book renders the executed copies without running anything again.

``jupyter-book build`` executes the chapters one after another on every core; on a 2-core machine
two one-thread chapters at a time get more done, and the book's cold build has a time budget
(the README's compute table). The executed chapters are staged with the book's other sources in
``_build/stage`` (its ``_config.yml`` the book's with execution off), and the HTML goes to ``_build/html``
as before::

    python -m merging_helpers.book_build [--lanes 2] [--root .]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .lanes import Lanes

STAGE, EXECUTED = Path("_build/stage"), Path("_build/executed")


def waits_for(stems, full: bool = True) -> dict[str, set[str]]:
    """What each chapter waits for: chapter 8 reads the records of the chapters before it, chapter 9
    times merges in the folder chapter 7 uses; in the full mode (``make book``) chapter 8b too reads
    the full records this build writes (in the quick mode it reads the shipped ones) (chapter 8)."""
    stems = set(stems)
    before_8 = {s for s in stems if s < "08_side_by_side"}
    waits = {"08_side_by_side": before_8, "09_merging_at_scale": {"07_rms_adaptive"} & stems}
    return waits | {"08b_language_model": before_8} if full else waits


def execute_one(notebook: Path, out: Path, timeout: int) -> None:
    """Run ``notebook`` top to bottom in its folder (as jupyter-book does) and write the executed copy
    to ``out`` atomically, also when a cell fails (its traceback is in the copy); a failed cell raises (chapter 8)."""
    import nbclient
    import nbformat
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, resources={"metadata": {"path": str(notebook.parent)}})
    try:
        client.execute()
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, out)


def execute_chapter(notebook: Path, out: Path, timeout: int, threads: int | None) -> tuple[int, float, str]:
    """:func:`execute_one` in a process of its own on ``threads`` threads: (exit status, seconds, the
    end of its output) (chapter 8)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "merging_helpers.book_build", "--one", str(notebook), str(out),
                           "--timeout", str(timeout)], env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr)[-4000:]


def cell_timeout(config_text: str) -> int:
    """The per-cell time limit of ``_config.yml`` (``execute: timeout:``), else 1200 s (chapter 8)."""
    found = re.search(r"^\s+timeout:\s*(\d+)", config_text, re.M)
    return int(found.group(1)) if found else 1200


def execute_book(root: Path, lanes: int = 2) -> dict[str, float]:
    """Every chapter of ``root/book`` executed into ``root/_build/executed/book`` in ``lanes`` lanes;
    chapter → seconds. Any failed chapter fails the run once the others are done, naming it (chapter 8)."""
    chapters = sorted((root / "book").glob("*.ipynb"))
    timeout = cell_timeout((root / "_config.yml").read_text())
    threads = 1 if lanes > 1 else None
    bar = tqdm(total=len(chapters), desc="chapters", unit="chapter")

    def run(chapter):
        status, seconds, tail = execute_chapter(chapter, root / EXECUTED / "book" / chapter.name, timeout, threads)
        bar.update(1)
        bar.write(f"{chapter.stem}: {'done' if status == 0 else 'FAILED'} in {seconds / 60:.1f} min")
        return status, seconds, tail

    runs = Lanes(chapters, run, waits_for(c.stem for c in chapters), lanes)
    outcomes = {c.stem: runs.result(c.stem) for c in chapters}
    bar.close()
    failed = {stem: tail for stem, (status, _, tail) in outcomes.items() if status != 0}
    if failed:
        raise SystemExit("chapters failed: " + ", ".join(failed) + "\n" + "\n".join(
            f"--- {stem}:\n{tail}" for stem, tail in failed.items()))
    return {stem: seconds for stem, (_, seconds, _) in outcomes.items()}


def config_without_execution(config: str, suppressed=()) -> str:
    """The text of the book's ``_config.yml`` with execution off and the warning kinds ``suppressed``
    added to Sphinx's ``suppress_warnings`` (chapter 8)."""
    if "execute_notebooks:" not in config or (suppressed and "suppress_warnings: [" not in config):
        raise ValueError("_config.yml: expected `execute_notebooks:` and `suppress_warnings: [` (sphinx: config:)")
    config = re.sub(r"execute_notebooks: \w+", 'execute_notebooks: "off"', config)
    return config.replace("suppress_warnings: [", "suppress_warnings: [" + "".join(f'"{w}", ' for w in suppressed), 1)


def stage(root: Path) -> Path:
    """``root/_build/stage``: the book's sources (``_config.yml`` with execution off, ``_toc.yml``,
    ``book/`` but its reader's edition) with the executed chapters in place of the sources (chapter 8)."""
    out = root / STAGE
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "book", out / "book", ignore=shutil.ignore_patterns("reader", ".ipynb_checkpoints"))
    for executed in sorted((root / EXECUTED / "book").glob("*.ipynb")):
        shutil.copy2(executed, out / "book" / executed.name)
    # the chapters' own Python warnings (e.g. "the traced model is at chance") are stderr in the executed
    # copies: the pages drop them (stderr_output: remove-warn) without failing the build on them
    (out / "_config.yml").write_text(config_without_execution((root / "_config.yml").read_text(), ("mystnb.stderr",)))
    shutil.copy2(root / "_toc.yml", out / "_toc.yml")
    return out


def render(root: Path) -> Path:
    """jupyter-book on the stage (:func:`stage`), warnings as errors; the HTML moved to
    ``root/_build/html`` (chapter 8)."""
    staged = stage(root)
    exe = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-book")
    if exe is None:
        raise SystemExit("jupyter-book is not installed here: `pip install -r requirements.txt`")
    if subprocess.run([exe, "build", str(staged), "--warningiserror", "--keep-going"]).returncode != 0:
        raise SystemExit(f"jupyter-book failed on the executed chapters in {staged} (its output is above)")
    html = root / "_build" / "html"
    shutil.rmtree(html, ignore_errors=True)
    shutil.move(str(staged / "_build" / "html"), str(html))
    return html


def main(argv=None) -> None:
    """``python -m merging_helpers.book_build [--lanes N] [--root DIR]``: execute every chapter in lanes,
    then render the book from the executed copies (``make book``) (chapter 8)."""
    parser = argparse.ArgumentParser(description="Execute the book's chapters in lanes, then build its HTML.")
    parser.add_argument("--lanes", type=int, default=2, help="chapters at a time, each on one thread (default 2)")
    parser.add_argument("--root", default=".", help="the repository (default: here)")
    parser.add_argument("--one", nargs=2, metavar=("NOTEBOOK", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=1200, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        execute_one(Path(args.one[0]).resolve(), Path(args.one[1]).resolve(), args.timeout)
        return
    if args.lanes < 1:
        parser.error(f"--lanes must be at least 1, got {args.lanes}")
    root = Path(args.root).resolve()
    if not (root / "_config.yml").exists() or not (root / "book").is_dir():
        parser.error(f"{root} is not the book's repository (no _config.yml and book/ there)")
    start = time.perf_counter()
    shutil.rmtree(root / EXECUTED, ignore_errors=True)  # this build's own copies, never the sources
    seconds = execute_book(root, args.lanes)
    print(f"chapters executed in {(time.perf_counter() - start) / 60:.1f} min, {args.lanes} at a time "
          f"(their own times add up to {sum(seconds.values()) / 60:.1f} min)", flush=True)
    print(f"book written to {render(root) / 'index.html'}", flush=True)


if __name__ == "__main__":
    main()
