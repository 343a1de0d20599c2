"""Input files held while a streaming merge maps them (appendix "Merging at scale", chapter 8).

A streaming merge reads its inputs through memory maps. If another process truncates an input
while pages of it are mapped, the next read of those pages kills the merge with SIGBUS: a crash
without a message. On Linux the merge therefore takes a read *lease* on every input file it
opens: a process that then opens that file for writing, or truncates it, is held off (a blocking
open waits, up to ``/proc/sys/fs/lease-break-time``; a non-blocking one fails) and this process
is sent SIGIO. The merge checks before every tensor and stops with :class:`InputChangedError`,
naming the file, before it reads that file again; closing the folders releases the leases.
Where leases are not available (not Linux, a merge outside the main thread, a file system or an
owner that refuses them) nothing is held and the merge runs as before.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None


class InputChangedError(RuntimeError):
    """An input file was opened for writing (or truncated) by another process during a merge
    (appendix, chapter 8)."""


class InputGuard:
    """Read leases on a streaming merge's input files (appendix, chapter 8): :meth:`start`,
    :meth:`protect` each opened file, :meth:`check` between tensors, :meth:`stop` once the files
    are closed."""

    def __init__(self) -> None:
        self.active = False
        self._leased: dict[int, Path] = {}
        self._signalled = False
        self._previous = None

    def start(self) -> "InputGuard":
        can = fcntl is not None and hasattr(fcntl, "F_SETLEASE") and hasattr(signal, "SIGIO")
        if can and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGIO, self._on_signal)
            self.active = True
        return self

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True
        if callable(self._previous):
            self._previous(signum, frame)

    def protect(self, fd: int, path: Path) -> None:
        """Take a read lease on the open file ``fd`` (no lease where the system refuses one:
        the file is open for writing elsewhere, we do not own it, or its file system has none)."""
        if not self.active:
            return
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            return
        self._leased[fd] = Path(path)

    def check(self) -> None:
        """Raise :class:`InputChangedError` if another process has asked to write a leased file."""
        if not self._signalled:
            return
        for fd, path in self._leased.items():
            try:
                held = fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
            except OSError:
                continue
            if not held:
                raise InputChangedError(
                    f"{path}: another process opened it for writing (or truncated it) during the merge; the merge "
                    "stopped before reading it again, and nothing was written (that process was held off until now)")

    def stop(self) -> None:
        """Release what is still leased and give SIGIO back to its previous handler."""
        if not self.active:
            return
        for fd in self._leased:
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:  # already closed with its folder: the lease went with it
                pass
        self._leased.clear()
        signal.signal(signal.SIGIO, self._previous if self._previous is not None else signal.SIG_DFL)
        self.active = False


__all__ = ["InputGuard", "InputChangedError"]
