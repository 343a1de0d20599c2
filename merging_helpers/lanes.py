"""Work run a few items at a time, each after the items it waits for (book infrastructure, chapter 8):
how ``make test`` and ``make book`` run the chapters, two at a time on a 2-core machine.

On this kind of machine two one-thread processes get more done than one two-thread process (the
OpenMP threads of one process spin-wait for each other), so the chapters run in lanes. A chapter
that reads what others write waits for them; a lane meanwhile takes the next chapter that waits
for nothing, so that neither lane sits idle while work is left.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping


class Lanes:
    """``items`` (each with a ``.stem``) run ``lanes`` at a time in background threads, each by
    ``run(item)``: a lane takes the first item, in the given order, none of whose ``waits_for[stem]``
    is unfinished. :meth:`result` waits for one item and returns what ``run`` returned (raises what
    it raised); :meth:`finish` waits for all; :meth:`stop` starts nothing more (chapter 8)."""

    def __init__(self, items: Iterable, run: Callable, waits_for: Mapping[str, set] | None = None, lanes: int = 2):
        self.pending, self.run, self.waits_for = list(items), run, dict(waits_for or {})
        self.unfinished = {item.stem for item in self.pending}
        self.runs: dict = {}
        self.changed = threading.Condition()
        for _ in range(min(max(1, lanes), len(self.pending))):
            threading.Thread(target=self._lane, daemon=True).start()

    def _take(self):
        with self.changed:
            while self.pending:
                ready = [i for i in self.pending if not set(self.waits_for.get(i.stem, ())) & self.unfinished]
                if ready:
                    self.pending.remove(ready[0])
                    return ready[0]
                self.changed.wait()
            return None

    def _lane(self) -> None:
        while (item := self._take()) is not None:
            try:
                outcome = self.run(item)
            except Exception as error:  # noqa: BLE001 - result() raises it for the caller
                outcome = error
            with self.changed:
                self.runs[item.stem] = outcome
                self.unfinished.discard(item.stem)
                self.changed.notify_all()

    def result(self, stem: str):
        with self.changed:
            self.changed.wait_for(lambda: stem in self.runs)
            outcome = self.runs[stem]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def finish(self) -> None:
        with self.changed:
            self.changed.wait_for(lambda: not self.unfinished)

    def stop(self) -> None:
        """No item starts any more: :meth:`finish` then waits only for those running (their ``run``
        decides how to end them)."""
        with self.changed:
            self.unfinished -= {i.stem for i in self.pending}
            self.pending.clear()
            self.changed.notify_all()
