"""Evaluation metrics against hand-worked cases (chapter 0)."""
import math
import os

import pytest
import torch

from merging_helpers import evaluation as ev
from merging_helpers import zoo as zoo_lib
from merging_helpers.evaluation import Evaluator, Scorer
from merging_helpers.tasks import few_shot


def test_accuracy_hand_worked():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.1]])
    labels = torch.tensor([0, 1, 1, 1])
    assert ev.accuracy(logits, labels) == pytest.approx(0.5)


def test_mean_true_label_probability_hand_worked():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = torch.tensor([1, 0])
    assert ev.mean_true_label_probability(logits, labels) == pytest.approx((0.75 + 0.5) / 2)


def test_majority_accuracy():
    assert ev.majority_accuracy([0, 1, 1, 2], [1, 1, 0, 2]) == pytest.approx(0.5)


def test_normalized_accuracy_and_missing_task():
    assert ev.normalized_accuracy({"a": 0.45}, {"a": 0.9, "b": 0.8}) == {"a": pytest.approx(0.5)}
    with pytest.raises(KeyError, match="b"):
        ev.normalized_accuracy({"b": 0.1}, {"a": 0.9})


def test_task_and_domain_ratio():
    assert ev.task_ratio(0.6, 0.8) == pytest.approx(0.75)
    # geometric mean of 0.5 and 2 is 1; of 0.25, 1, 4 is 1; of 0.9 and 0.4 is 0.6
    assert ev.domain_ratio([0.5, 2.0]) == pytest.approx(1.0)
    assert ev.domain_ratio({"x": 0.25, "y": 1.0, "z": 4.0}) == pytest.approx(1.0)
    assert ev.domain_ratio([0.9, 0.4]) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [[], [0.5, 0.0], [-1.0]])
def test_domain_ratio_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        ev.domain_ratio(bad)


def test_task_ratio_rejects_zero_dense():
    with pytest.raises(ValueError, match="positive dense score"):
        ev.task_ratio(0.5, 0.0)


def test_accuracy_shape_mismatch():
    with pytest.raises(ValueError, match="3 rows of logits but 2 labels"):
        ev.accuracy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# ---- the Scorer interface on the real zoo (chapters 4-5 rely on it) ----------------------------


DEVICE = os.environ.get("MERGING_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh sets "cuda"


@pytest.fixture(scope="module")
def scorer():
    return Evaluator(zoo_lib.load_zoo(device=DEVICE), device=DEVICE)


def test_is_a_scorer_and_scores_without_loading(scorer):
    assert isinstance(scorer, Scorer)
    zoo = scorer.zoo
    before = {n: p.clone() for n, p in scorer.encoder.named_parameters()}
    functional = scorer.accuracy(zoo.experts["news"], split="validation", tasks=["news"])
    assert all(torch.equal(p, before[n]) for n, p in scorer.encoder.named_parameters())  # nothing loaded
    scorer.load(zoo.experts["news"])  # the old way: load the weights into the module
    loaded = {"news": scorer.logits("news", zoo.heads["news"], scorer.batches("news", "validation"),
                                    bf16=scorer.bf16_accuracy)}
    scorer.load(zoo.base)
    from merging_helpers.evaluation import accuracy
    assert functional["news"] == accuracy(*loaded["news"])


def test_loss_gradient_matches_finite_differences(scorer):
    zoo = scorer.zoo
    shots = few_shot(zoo.tasks["sentiment"], 5, seed=0)
    grads = scorer.loss_gradient(zoo.base, "sentiment", shots)
    assert set(grads) == set(scorer.params(zoo.base))
    name = "encoder.layer.5.output.dense.weight"
    params = {n: t.double() for n, t in scorer.params(zoo.base).items()}
    head = {k: v.double() for k, v in zoo.heads["sentiment"].items()}
    g = grads[name].double()
    direction = torch.zeros_like(params[name])
    top = g.abs().flatten().topk(20).indices
    direction.view(-1)[top] = g.view(-1)[top].sign()  # a direction where the loss changes
    h = 1e-4
    scorer.encoder.double()
    try:
        # the float32 gradient is checked loosely (GPU kernels round differently), the float64
        # one tightly: it is the gradient of the loss the finite differences measure
        g64 = scorer.loss_gradient(params, "sentiment", shots, head=head, dtype=torch.float64)[name]
        assert g64.dtype == torch.float64
        torch.testing.assert_close(g, g64, rtol=2e-2, atol=1e-3 * float(g64.abs().max()))
        def loss_at(step):
            p = dict(params)
            p[name] = params[name] + step * direction
            return float(scorer.loss(p, "sentiment", shots, head=head))
        fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    finally:
        scorer.encoder.float()
    analytic = float((g64 * direction).sum())
    assert analytic != 0 and fd == pytest.approx(analytic, rel=1e-3)


def test_batched_variants_equal_single_calls(scorer):
    zoo = scorer.zoo
    shots = few_shot(zoo.tasks["news"], 5, seed=1)
    expert = zoo.experts["news"]
    layers = [f"encoder.layer.{i}." for i in (0, 3, 5)]
    # causal-tracing style: put one layer of the expert back to the base
    variants = [{n: zoo.base[n] for n in expert if n.startswith(prefix)} for prefix in layers] + [{}]
    batched = scorer.true_label_probabilities(expert, variants, "news", shots, chunk=2)
    singles = [scorer.true_label_probability({**expert, **v}, "news", shots) for v in variants]
    torch.testing.assert_close(batched, torch.tensor(singles), rtol=1e-5, atol=1e-6)
    assert batched[-1] == pytest.approx(singles[-1]) and len(set(batched.tolist())) == len(variants)


def test_bad_parameters_and_sets_are_named(scorer):
    zoo = scorer.zoo
    sd = dict(zoo.base)
    name = "encoder.layer.0.attention.self.query.weight"
    with pytest.raises(ValueError, match=rf"{name}' has shape \(3, 4\)"):
        scorer.accuracy({**sd, name: torch.zeros(3, 4)}, tasks=["news"])
    del sd[name]
    with pytest.raises(KeyError, match="missing \\['encoder.layer.0.attention.self.query.weight'\\]"):
        scorer.accuracy(sd, tasks=["news"])
    with pytest.raises(KeyError, match="unexpected \\['lm_head.weight'\\]"):
        scorer.accuracy({**zoo.base, "lm_head.weight": torch.zeros(2)}, tasks=["news"])
    with pytest.raises(ValueError, match="few-shot set is empty"):
        scorer.true_label_probability(zoo.base, "news", [])
    with pytest.raises(ValueError, match=r"variant 0: .* has shape"):
        scorer.true_label_probabilities(zoo.base, [{name: torch.zeros(2)}], "news", [("a", 0)])


def test_correct_per_example_agrees_with_accuracy(scorer):
    zoo = scorer.zoo
    right = scorer.correct(zoo.experts["news"], split="validation", tasks=["news", "sentiment"])
    acc = scorer.accuracy(zoo.experts["news"], split="validation", tasks=["news", "sentiment"])
    for task, vector in right.items():
        assert vector.dtype == torch.bool and vector.device.type == "cpu"
        assert len(vector) == len(zoo.tasks[task].splits["validation"])
        assert float(vector.float().mean()) == pytest.approx(acc[task])


@pytest.mark.slow
def test_bf16_accuracy_agrees_with_float32(scorer):
    """Scoring accuracy with bfloat16 products must not move a merge's accuracy by more than a few
    examples; it is the default only on a CPU that multiplies bfloat16 natively (elsewhere it is slower)."""
    from merging_helpers.evaluation import task_arithmetic_state
    from merging_helpers.evaluation import native_bf16_cpu
    zoo = scorer.zoo
    exact = Evaluator(zoo, device=DEVICE, bf16_accuracy=False)
    assert scorer.bf16_accuracy == (torch.device(DEVICE).type == "cpu" and native_bf16_cpu())
    assert not exact.bf16_accuracy
    scorer = Evaluator(zoo, device=DEVICE, bf16_accuracy=True)  # compare the bfloat16 path wherever it runs
    merged = task_arithmetic_state(zoo.base, zoo.experts, 0.4)
    fast, slow = scorer.correct(merged, split="test"), exact.correct(merged, split="test")
    changed = sum(int((fast[t] != slow[t]).sum()) for t in fast)
    total = sum(len(v) for v in slow.values())
    assert changed <= 0.005 * total, f"{changed} of {total} test predictions changed"
    # APL's probabilities and the losses are float32 either way
    shots = few_shot(zoo.tasks["news"], 2, seed=0)
    assert scorer.true_label_probability(zoo.experts["news"], "news", shots) == \
        exact.true_label_probability(zoo.experts["news"], "news", shots)


def test_choose_lambda_is_the_one_rule():
    from merging_helpers.evaluation import LAMBDA_GRID, choose_lambda
    from merging_helpers.sweeps import pick_lambda
    import pandas as pd
    assert choose_lambda({0.3: 0.7, 0.1: 0.8, 0.5: 0.8}) == 0.1          # best mean, ties to the smallest λ
    frame = pd.DataFrame({"lam": [0.1, 0.1, 0.5, 0.5], "accuracy": [0.6, 1.0, 0.8, 0.8]})
    assert pick_lambda(frame) == choose_lambda({0.1: 0.8, 0.5: 0.8}) == 0.1
    assert LAMBDA_GRID[0] == 0.1 and LAMBDA_GRID[-1] == 1.0 and len(LAMBDA_GRID) == 10
    with pytest.raises(ValueError, match="no λ"):
        choose_lambda({})
