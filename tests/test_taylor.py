"""Chapter 5's Taylor approximation: partition sums by hand, exactness on linear and quadratic
losses, a partition with Δ = 0 scores 0. (The gradient itself is checked against finite
differences in tests/test_evaluation.py: it is the scorer's.)"""
import pytest
import torch

from merging_helpers import apl, taylor
from merging_helpers import zoo as zoo_lib
from merging_helpers.evaluation import Evaluator
from merging_helpers.tasks import few_shot


@pytest.fixture(scope="module")
def scorer():
    return Evaluator(zoo_lib.load_zoo(device="cpu"), device="cpu")


def test_partition_products_by_hand():
    delta = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([1.0, -1.0])}
    grad = {"w": torch.tensor([[1.0, 0.0], [0.5, -1.0]]), "b": torch.tensor([2.0, 3.0])}
    groups = {"all": {"w": None, "b": None}, "row.0": {"w": 0, "b": 0}, "row.1": {"w": 1, "b": 1}}
    # all: 1 + 0 + 1.5 − 4 + 2 − 3 = −2.5; row 0: 1 + 0 + 2 = 3; row 1: 1.5 − 4 − 3 = −5.5
    assert taylor.partition_products(delta, grad, groups).tolist() == [-2.5, 3.0, -5.5]
    with pytest.raises(KeyError, match="no delta or no gradient"):
        taylor.partition_products(delta, {"w": grad["w"]}, groups)
    with pytest.raises(ValueError, match="gradient shape"):
        taylor.partition_products(delta, {**grad, "b": torch.zeros(3)}, groups)
    with pytest.raises(FloatingPointError, match="'b'"):
        taylor.partition_products(delta, {**grad, "b": torch.tensor([float("nan"), 0.0])}, groups)


def test_first_order_is_exact_for_a_linear_loss_and_second_order_for_a_quadratic():
    g = torch.Generator().manual_seed(0)
    c, b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = a @ a.T
    at, step = {"x": torch.randn(5, generator=g, dtype=torch.float64)}, {"x": torch.randn(5, generator=g, dtype=torch.float64)}
    moved = {"x": at["x"] + step["x"]}

    def linear(p):
        return c @ p["x"]

    def quadratic(p):
        return 0.5 * p["x"] @ a @ p["x"] + b @ p["x"]

    first, second = taylor.taylor_terms(linear, at, step)
    assert first == pytest.approx(float(linear(moved) - linear(at)), rel=1e-12) and second == pytest.approx(0, abs=1e-12)
    first, second = taylor.taylor_terms(quadratic, at, step)
    gap = float(quadratic(moved) - quadratic(at))
    assert first + second == pytest.approx(gap, rel=1e-12)
    assert abs(first - gap) > 1e-3  # the first order alone is not exact here
    assert second == pytest.approx(0.5 * float(step["x"] @ a @ step["x"]), rel=1e-12)


def test_taylor_terms_bad_input():
    at = {"x": torch.ones(3)}
    with pytest.raises(ValueError, match="scalar"):
        taylor.taylor_terms(lambda p: p["x"] * 2, at, {"x": torch.ones(3)})
    with pytest.raises(KeyError, match="not parameters"):
        taylor.taylor_terms(lambda p: p["x"].sum(), at, {"y": torch.ones(3)})


def test_a_partition_without_delta_scores_zero_and_signs_agree(scorer):
    zoo = scorer.zoo
    expert = {n: (zoo.base[n] if n.startswith("encoder.layer.2.") else t) for n, t in zoo.experts["news"].items()}
    shots = few_shot(zoo.tasks["news"], 2, seed=0)
    plain = taylor.gradient_importance(scorer, zoo.base, expert, "news", shots, "layer")
    signed = taylor.gradient_importance(scorer, zoo.base, expert, "news", shots, "layer", signed=True)
    assert plain.keys == [f"layer.{i}" for i in range(6)]
    assert float(plain.values[2]) == 0.0 and float(signed.values[2]) == 0.0
    torch.testing.assert_close(plain.values, -signed.values.abs())
    assert bool((plain.values[[0, 1, 3, 4, 5]] < 0).all())
    # the model level is the sum over all of the encoder, so it is the sum of the signed groups that tile it
    model = taylor.gradient_importance(scorer, zoo.base, expert, "news", shots, "model", signed=True)
    outside = taylor.partition_products(
        {n: expert[n].float() - zoo.base[n].float() for n in expert if not n.startswith("encoder.layer.")},
        scorer.loss_gradient(zoo.base, "news", shots), {"rest": {n: None for n in expert if not n.startswith("encoder.layer.")
                                                                  and zoo.base[n].is_floating_point()}})
    assert float(model.values[0]) == pytest.approx(float(signed.values.sum() + outside[0]), rel=1e-6)
    # all levels from one backward pass give the same numbers; the hidden groups tile the residual writers
    every = taylor.gradient_importances(scorer, zoo.base, expert, "news", shots, signed=True)
    torch.testing.assert_close(every["layer"].values, signed.values)
    writers = {n: None for n in expert if apl.writes_residual(n)}
    delta = {n: expert[n].float() - zoo.base[n].float() for n in writers}
    total = taylor.partition_products(delta, scorer.loss_gradient(zoo.base, "news", shots), {"writers": writers})
    assert float(every["hidden"].values.sum()) == pytest.approx(float(total[0]), rel=1e-6)
    rates = apl.drop_rates(plain, 0.9, 0.05, "linear")  # usable by apl unchanged
    assert float(rates[2]) == pytest.approx(0.95)  # the partition without delta is the least important


def test_a_loss_already_near_zero_warns():
    class Stub:  # a "scorer" whose loss at the base is ~0: its gradient says nothing
        def loss_gradient(self, state, task, examples, head=None):
            return {n: torch.zeros_like(t) for n, t in state.items()}

        def params(self, state):
            return state

        def loss(self, params, task, examples, head=None):
            return torch.tensor(1e-7)

        def few_shot_batches(self, examples):
            return examples

        def logits(self, task, head, batches, params):
            return torch.tensor([[0.0, 1.0]]), torch.tensor([1])

    base = {"encoder.layer.0.output.dense.weight": torch.zeros(2, 2)}
    expert = {k: v + 1 for k, v in base.items()}
    with pytest.warns(UserWarning, match="near zero"):
        imp = taylor.gradient_importance(Stub(), base, expert, "t", [("a", 1)], "layer")
    assert imp.values.tolist() == [0.0]
    with pytest.raises(ValueError, match="empty"):
        taylor.gradient_importance(Stub(), base, expert, "t", [], "layer")


def test_removal_gaps_first_order_exact_for_linear_second_for_quadratic():
    g = torch.Generator().manual_seed(1)
    c, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a @ a.T
    base = {"x": torch.randn(6, generator=g, dtype=torch.float64), "frozen": torch.ones(2, dtype=torch.float64)}
    delta = {"x": torch.randn(6, generator=g, dtype=torch.float64)}
    masks = {"half": {"x": torch.tensor([1, 0, 1, 0, 1, 0])}, "none": {"x": torch.zeros(6)}, "all": {"x": torch.ones(6)}}

    def linear(p):
        return c @ p["x"] + p["frozen"].sum()

    def quadratic(p):
        return 0.5 * p["x"] @ a @ p["x"] + b @ p["x"]

    for row in taylor.removal_gaps(linear, base, delta, masks):
        removed = delta["x"] * masks[row["mask"]]["x"]
        assert row["actual"] == pytest.approx(-float(c @ removed), abs=1e-12)
        assert row["first"] == pytest.approx(row["actual"], abs=1e-12)
        assert row["second"] == pytest.approx(row["actual"], abs=1e-12)
        assert row["first_at_expert"] == pytest.approx(row["actual"], abs=1e-12)
    rows = {r["mask"]: r for r in taylor.removal_gaps(quadratic, base, delta, masks)}
    for label, row in rows.items():
        m = delta["x"] * masks[label]["x"]
        x_t = base["x"] + delta["x"]
        exact = float(quadratic({"x": x_t - m}) - quadratic({"x": x_t}))
        assert row["actual"] == pytest.approx(exact, rel=1e-12, abs=1e-12)
        assert row["second"] == pytest.approx(exact, rel=1e-10, abs=1e-12)
        # the paper's first order is −g(θ_b)·m; around the expert it is −∇L(θ_t)·m
        assert row["first"] == pytest.approx(-float((a @ base["x"] + b) @ m), rel=1e-10, abs=1e-12)
        assert row["first_at_expert"] == pytest.approx(-float((a @ x_t + b) @ m), rel=1e-10, abs=1e-12)
    assert rows["none"]["actual"] == 0.0 and rows["none"]["first"] == pytest.approx(0.0, abs=1e-12)
    assert abs(rows["half"]["first"] - rows["half"]["actual"]) > 1e-3  # the first order alone is not exact
    with pytest.raises(KeyError, match="no delta"):
        taylor.removal_gaps(linear, base, delta, {"bad": {"frozen": torch.ones(2)}})


class LinearScorer:
    """A stub scorer whose loss on example (x, y) is y·(w·x): its per-example gradient is y·x."""

    def __init__(self, name):
        self.name = name

    def loss_gradient(self, state, task, examples, head=None):
        return {self.name: sum(y * x for x, y in examples) / len(examples)}

    def params(self, state):
        return state

    def loss(self, params, task, examples, head=None):
        return sum(y * (params[self.name] * x).sum() for x, y in examples) / len(examples)

    def few_shot_batches(self, examples):
        return examples

    def logits(self, task, head, batches, params):
        return torch.tensor([[0.0, 1.0]]), torch.tensor([1])


def test_fisher_importance_by_hand():
    name = "encoder.layer.0.output.dense.weight"
    base = {name: torch.zeros(2, 2)}
    expert = {name: torch.tensor([[1.0, 2.0], [0.0, -1.0]])}
    examples = [(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), 1.0), (torch.tensor([[2.0, 0.0], [0.0, 3.0]]), -1.0)]
    fisher = taylor.fisher_importances(LinearScorer(name), base, expert, "t", examples, ("model", "hidden"))
    # (Δ·g_n)² per entry: n=1: [[1, 4], [0, 1]], n=2: [[4, 0], [0, 9]] → rows 5 + 4 = 9 and 1 + 9 = 10
    assert fisher["hidden"].values.tolist() == [-9.0, -10.0]
    assert fisher["model"].values.tolist() == [-19.0]
    # the signed first order of the same set cancels across examples; the Fisher sum cannot
    with pytest.warns(UserWarning, match="near zero"):  # this stub's loss at the base is 0
        plain = taylor.gradient_importance(LinearScorer(name), base, expert, "t", examples, "model", signed=True)
    assert float(plain.values[0]) == 1.5  # Δ·(x₁ − x₂)/2 = −0.5 + 1 + 0 + 1
    with pytest.raises(ValueError, match="empty"):
        taylor.fisher_importances(LinearScorer(name), base, expert, "t", [], "model")
