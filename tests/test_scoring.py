"""The scorer interface on the real zoo (evaluation.Evaluator as a Scorer): scores given
parameters without loading them, the few-shot loss and its gradient (checked by finite
differences), K variants in one batched call equal K single calls, clear errors."""
import pytest
import torch

from merging_helpers import zoo as zoo_lib
from merging_helpers.evaluation import Evaluator, Scorer
from merging_helpers.tasks import few_shot


@pytest.fixture(scope="module")
def scorer():
    return Evaluator(zoo_lib.load_zoo(device="cpu"), device="cpu")


def test_is_a_scorer_and_scores_without_loading(scorer):
    assert isinstance(scorer, Scorer)
    zoo = scorer.zoo
    before = {n: p.clone() for n, p in scorer.encoder.named_parameters()}
    functional = scorer.accuracy(zoo.experts["news"], split="validation", tasks=["news"])
    assert all(torch.equal(p, before[n]) for n, p in scorer.encoder.named_parameters())  # nothing loaded
    scorer.load(zoo.experts["news"])  # the old way: load the weights into the module
    loaded = {"news": scorer.logits("news", zoo.heads["news"], scorer.batches("news", "validation"))}
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
    g = grads[name].double()
    direction = torch.zeros_like(params[name])
    top = g.abs().flatten().topk(20).indices
    direction.view(-1)[top] = g.view(-1)[top].sign()  # a direction where the loss changes
    h = 1e-4
    scorer.encoder.double()
    try:
        def loss_at(step):
            p = dict(params)
            p[name] = params[name] + step * direction
            return float(scorer.loss(p, "sentiment", shots, head={k: v.double() for k, v in zoo.heads["sentiment"].items()}))
        fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    finally:
        scorer.encoder.float()
    analytic = float((g * direction).sum())
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
