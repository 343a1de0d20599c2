"""The real zoo must be worth merging (issue bar, chapter 0).

Builds the zoo on first use (≈ 8 min on 2 CPU cores, then cached; the chapters need it
anyway) and checks the acceptance bar on the test splits:
experts beat a head on the frozen base by ≥ 3 points on ≥ 4 tasks, and Task Arithmetic of
all experts loses ≥ 3 points of average accuracy against them.
"""
import pytest

from merging_helpers import zoo as zoo_lib
from merging_helpers.evaluation import Evaluator, zoo_table

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m 'not slow'` leaves it out


@pytest.fixture(scope="module")
def table():
    zoo = zoo_lib.load_zoo(device="cpu")
    table, _ = zoo_table(Evaluator(zoo, device="cpu"))
    print(table.to_string())
    return table


def test_experts_beat_the_frozen_base(table):
    gain = (table["expert"] - table["frozen base + head"]).drop("mean")
    assert (gain >= 3).sum() >= 4, gain.to_dict()


def test_task_arithmetic_shows_interference(table):
    ta = [c for c in table.columns if c.startswith("task arithmetic")][0]
    assert table.loc["mean", "expert"] - table.loc["mean", ta] >= 3, table.loc["mean"].to_dict()


def test_experts_beat_majority_everywhere(table):
    assert (table["expert"] > table["majority"] + 5).all(), table[["majority", "expert"]].to_dict()
