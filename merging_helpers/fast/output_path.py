"""Where a merged checkpoint may be written, and what an interrupted write left (appendix, chapter 8).

:func:`check_output_path` refuses an output folder that is an input, lies inside one, or
cannot be written, before any long work starts. A write in progress lives in a temporary
folder next to the target that carries an owner file (host and process id);
:func:`recover_leftovers` removes such folders only when their process is gone, and never
anything this package did not make.
"""


from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

__all__ = ["check_output_path", "recover_leftovers", "glob_escape", "OWNER_FILE"]


def _writable_folder(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) in which a new
    folder cannot be made, or None when a test folder could be made and removed."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return probe
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe))
    except OSError:
        return probe
    return None


def check_output_path(out_dir: str | os.PathLike, input_dirs: Iterable[str | os.PathLike],
                      overwrite: bool = False) -> Path:
    """Refuse an output folder equal to, inside, or containing an input folder, an
    existing non-empty output unless ``overwrite``, an output whose parent is not a
    writable folder, and (with ``overwrite``) one that cannot be moved aside: all before
    any work. Returns the resolved path (appendix, chapter 8)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    out = Path(os.path.realpath(out_dir))
    for inp in input_dirs:
        src = Path(os.path.realpath(inp))
        if out == src:
            raise ValueError(f"output folder {out} is an input folder")
        if src in out.parents:
            raise ValueError(f"output folder {out} is inside input folder {src}")
        if out in src.parents:
            raise ValueError(f"output folder {out} contains input folder {src}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"output folder {out} exists and is not empty; pass overwrite=True to replace it"
                )
            if os.path.ismount(out) or not os.access(out, os.W_OK):
                raise PermissionError(f"overwrite=True: the existing output folder {out} cannot be moved aside "
                                      "(a mount point, or not writable); choose another output folder")
    blocked = _writable_folder(out.parent)
    if blocked is not None:
        raise PermissionError(f"cannot create the output folder {out}: {blocked} is not a writable folder")
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OWNER_FILE = ".merging_helpers-owner"  # inside a temporary output folder: "<host> <pid>"


def _owner_line() -> str:
    """What the owner file of a folder this process makes says: "<host> <pid>"."""
    return f"{os.uname().nodename} {os.getpid()}"


def _ours(folder: Path, allowed: set[str] | None = None) -> list[str] | None:
    """The owner line ("<host> <pid>") of a folder this package made, or None: a folder counts as
    ours only if it holds the owner file and, when ``allowed`` is given, nothing else but those entries."""
    marker = folder / OWNER_FILE
    if not folder.is_dir() or not marker.is_file():
        return None
    if allowed is not None and not {p.name for p in folder.iterdir()} <= allowed | {OWNER_FILE}:
        return None
    return marker.read_text().split()


def recover_leftovers(out_dir: str | os.PathLike) -> list[str]:
    """Clean what an interrupted write to ``out_dir`` left next to it (appendix, chapter 8):

    * ``.<out>.tmp-*`` of a merge whose process is gone (killed mid-way): deleted;
    * ``.<out>.old-*`` of an overwrite that stopped between its two moves: the previous
      output is moved back when ``out_dir`` is missing, else deleted.

    Only folders that prove they are this package's (its owner file inside) are touched;
    folders of a merge still running (same host, live process) are left alone, and so is a
    folder of such a name without the owner file (someone else's: it is named in a warning).
    What will be done is said in a warning before it is done. Returns one line per action."""
    out = Path(os.path.realpath(out_dir))
    if not out.parent.is_dir():
        return []
    host, plan, foreign = os.uname().nodename, [], []
    for tmp in sorted(out.parent.glob(f".{glob_escape(out.name)}.tmp-*")):
        owner = _ours(tmp)  # an unfinished output may hold anything
        if owner is None:
            foreign.append(tmp.name)
        elif not (len(owner) == 2 and owner[0] == host and owner[1].isdigit() and _process_alive(int(owner[1]))):
            plan.append(("delete", tmp, f"delete {tmp.name}, the unfinished output of an interrupted merge"))
    for old in sorted(out.parent.glob(f".{glob_escape(out.name)}.old-*")):
        if _ours(old, {"x"}) is None:
            foreign.append(old.name)
        elif (old / "x").is_dir() and not out.exists():
            plan.append(("restore", old, f"move the previous {out.name} back from {old.name} (an overwrite "
                                         "stopped half-way)"))
        else:
            plan.append(("delete", old, f"delete {old.name}, the replaced output of an earlier overwrite"))
    if foreign:
        warnings.warn(f"{out.parent}: left alone {foreign}: named like this package's temporary folders but "
                      f"without its owner file, so not made by it", stacklevel=2)
    if plan:
        warnings.warn(f"{out}: recovering from an interrupted merge: " + "; ".join(w for _, _, w in plan),
                      stacklevel=2)
    for action, folder, _ in plan:
        if action == "restore":
            os.replace(folder / "x", out)
        shutil.rmtree(folder, ignore_errors=True)
    return [w.replace("delete", "deleted", 1).replace("move ", "moved ", 1) for _, _, w in plan]


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters escaped (appendix, chapter 8)."""
    return re.sub(r"([*?\[])", r"[\1]", name)
