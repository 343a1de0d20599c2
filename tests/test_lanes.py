"""merging_helpers.lanes: items in lanes, each after what it waits for."""
import threading
import time
from types import SimpleNamespace

import pytest

from merging_helpers.lanes import Lanes


def items(*stems):
    return [SimpleNamespace(stem=s) for s in stems]


def test_an_item_starts_only_after_what_it_waits_for_and_the_other_lane_keeps_busy():
    log, lock = [], threading.Lock()

    def run(item):
        with lock:
            log.append(("start", item.stem))
        time.sleep(0.3 if item.stem == "a" else 0.01)
        with lock:
            log.append(("end", item.stem))
        return item.stem.upper()

    lanes = Lanes(items("a", "late", "b", "c"), run, {"late": {"a", "b"}}, lanes=2)
    assert [lanes.result(s) for s in ("a", "late", "b", "c")] == ["A", "LATE", "B", "C"]
    at = {entry: i for i, entry in enumerate(log)}
    assert at["start", "late"] > max(at["end", "a"], at["end", "b"])
    assert at["start", "c"] < at["end", "a"]  # not held up behind "late"
    assert sorted(s for what, s in log if what == "start") == ["a", "b", "c", "late"]


def test_what_run_raises_is_raised_by_result_and_the_rest_still_run():
    def run(item):
        if item.stem == "bad":
            raise ValueError("bad item")
        return 1

    lanes = Lanes(items("bad", "good"), run, lanes=1)
    with pytest.raises(ValueError, match="bad item"):
        lanes.result("bad")
    assert lanes.result("good") == 1


def test_after_stop_nothing_new_starts_and_finish_returns():
    go, started = threading.Event(), []

    def run(item):
        started.append(item.stem)
        go.wait(5)

    lanes = Lanes(items("a", "b", "c"), run, lanes=1)
    time.sleep(0.1)
    lanes.stop()
    go.set()
    lanes.finish()
    assert started == ["a"]
